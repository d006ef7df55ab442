"""The router's pure decisions: which pods are replicas, which replica gets a request, how
an interrupted stream's continuation is asked for and relayed."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from cheapspot.contract import ANNOTATION_DRAINING, LABEL_POOL, LABEL_POOL_ROLE
from cheapspot_operator.router import resumability, routing, validation
from cheapspot_operator.router.replicas import ReplicaSet
from cheapspot_operator.router.routing import Load, Replica, StreamState
from cheapspot_operator.router.server import Router


def pod(
    name: str,
    ip: str | None = "10.0.0.1",
    *,
    ready: bool = True,
    role: str = "replica",
    annotations: dict[str, str] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "labels": {LABEL_POOL: "p", LABEL_POOL_ROLE: role},
        "annotations": annotations or {},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status: dict[str, Any] = {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_replica_from_pod_reads_readiness_draining_and_ip() -> None:
    r = routing.replica_from_pod(pod("a", "127.0.0.7"))
    assert r == Replica("a", "127.0.0.7", 8000, ready=True, draining=False, admin_port=8001)
    assert r.url == "http://127.0.0.7:8000" and r.usable
    assert r.admin_url == "http://127.0.0.7:8001"
    assert routing.replica_from_pod(pod("a", None)) is None
    assert routing.replica_from_pod(pod("a", role="router")) is None
    assert not routing.replica_from_pod(pod("a", ready=False)).usable  # type: ignore[union-attr]
    drained = routing.replica_from_pod(
        pod("a", annotations={ANNOTATION_DRAINING: "2026-01-01T00:02:00Z"})
    )
    assert drained is not None and drained.draining and not drained.usable
    deleting = routing.replica_from_pod(pod("a", deleting=True))
    assert deleting is not None and not deleting.usable


def test_choose_takes_the_fewest_in_flight_then_the_one_chosen_longest_ago() -> None:
    reps = [Replica(n, f"10.0.0.{i}", ready=True) for i, n in enumerate("abc")]
    load = Load(in_flight={"a": 3, "b": 1, "c": 2})
    load.answered("c", "qa", 200, 0.0)
    # c holds qa, but so does every replica (they load the spec's adapters before ready)
    assert routing.choose(reps, "qa", load, capacity=8).name == "b"  # type: ignore[union-attr]
    assert routing.choose(reps, "qa", load, capacity=8, exclude={"b"}).name == "c"  # type: ignore[union-attr]
    # equal load: the one chosen longest ago, not the first by name
    even = Load()
    for name in ("b", "a", "c"):
        even.take(name)
        even.in_flight[name] = 0
    assert routing.choose(reps, "qa", even, capacity=8).name == "b"  # type: ignore[union-attr]


def test_choose_prefers_the_adapters_holders_only_where_a_replica_lacks_it() -> None:
    reps = [Replica(n, f"10.0.0.{i}", ready=True) for i, n in enumerate("abc")]
    load = Load(in_flight={"a": 0, "b": 3, "c": 1})
    load.answered("b", "new", 200, 0.0)
    load.answered("a", "new", 404, 5.0)
    lacking = load.lacking("new", since=0.0)
    assert lacking == {"a"}
    # an adapter still loading on a: b answered for it, c is unknown, a lacks it
    assert routing.choose(reps, "new", load, capacity=8, lacking=lacking).name == "b"  # type: ignore[union-attr]
    assert routing.choose(reps, "new", load, capacity=3, lacking=lacking).name == "c"  # type: ignore[union-attr]
    assert routing.choose(reps, "new", load, capacity=3, exclude={"c"}, lacking=lacking).name == "a"  # type: ignore[union-attr]
    # the 404 is old: no replica is known to lack it, load decides again
    assert load.lacking("new", since=6.0) == set()
    assert routing.choose(reps, "new", load, capacity=8).name == "a"  # type: ignore[union-attr]
    # a success on a forgets its 404
    load.answered("a", "new", 200, 7.0)
    assert load.lacking("new", since=0.0) == set()


def test_choose_never_picks_draining_or_unready_and_none_when_all_busy() -> None:
    reps = [
        Replica("a", "h", ready=True, draining=True),
        Replica("b", "h", ready=False),
        Replica("c", "h", ready=True),
    ]
    load = Load(in_flight={"c": 1})
    load.answered("a", "m", 200, 0.0)
    load.answered("b", "m", 200, 0.0)
    assert routing.choose(reps, "m", load, capacity=4).name == "c"  # type: ignore[union-attr]
    assert routing.choose(reps, "m", load, capacity=1) is None
    assert routing.choose(reps[:2], "m", Load(), capacity=4) is None


POOL = [Replica(f"replica-0-{i}", f"10.0.0.{i}", ready=True) for i in range(3)]
MODELS = ["base", "qa", "chat"]


def test_a_pool_below_capacity_spreads_its_requests_over_every_replica() -> None:
    """The sequence a pool sees: one request per model, then 6 concurrent streams for 600
    requests, each answered 200, through the router's own bookkeeping (acquire, answer,
    release). Ranking by 'has served this model' first sent all 600 to replica-0-0 until it
    held --capacity (32) in flight; the other replicas sat idle."""

    async def scenario() -> Counter[str]:
        replicas = ReplicaSet(capacity=32)
        await replicas.update(POOL)
        for model in MODELS:
            r = await replicas.acquire(model, set(), deadline=1e18)
            assert r is not None
            replicas.answered(r.name, model, 200)
            await replicas.release(r.name)
        counts: Counter[str] = Counter()

        async def stream(worker: int) -> None:
            for k in range(100):
                model = MODELS[(worker + k) % len(MODELS)]
                r = await replicas.acquire(model, set(), deadline=1e18)
                assert r is not None
                counts[r.name] += 1
                replicas.answered(r.name, model, 200)
                await asyncio.sleep(0)  # the stream runs while the others start theirs
                await replicas.release(r.name)

        await asyncio.gather(*(stream(w) for w in range(6)))
        return counts

    counts = asyncio.run(scenario())
    assert sum(counts.values()) == 600
    # a fair share: 200 each; the bound is loose on purpose (the order streams end in decides
    # the exact split), what it rules out is a replica left idle or one taking most
    assert all(150 <= counts[r.name] <= 250 for r in POOL), dict(counts)


def test_a_404_is_not_remembered_as_holding_the_adapter_and_a_success_is() -> None:
    """A replica chosen for a model it then answered 404 for (an adapter still loading there
    during a rollout) was recorded as serving it at the choice, so every later request for
    the model went back to it and got the same 404."""

    async def scenario() -> list[str]:
        replicas = ReplicaSet(capacity=32)
        await replicas.update(POOL)
        seen = []
        for _ in range(4):
            r = await replicas.acquire("new", set(), deadline=1e18)
            assert r is not None
            seen.append(r.name)
            # only replica-0-2 has loaded the new adapter yet
            replicas.answered(r.name, "new", 200 if r.name == "replica-0-2" else 404)
            await replicas.release(r.name)
        return seen

    # each lacking replica is asked once, then the one holding it takes the model
    assert asyncio.run(scenario()) == ["replica-0-0", "replica-0-1", "replica-0-2", "replica-0-2"]


def test_a_404_forgets_a_success_and_failures_record_nothing() -> None:
    load = Load()
    load.answered("a", "qa", 200, 0.0)
    assert "qa" in load.holds["a"]
    load.answered("a", "qa", 404, 1.0)  # unloaded since (a rollout removed it)
    assert "qa" not in load.holds["a"]
    for status in (500, 503, 400, 0):  # a crash, a refusal, a bad prompt, no answer
        load.answered("a", "other", status, 2.0)
    assert "other" not in load.holds.get("a", {}) and "other" not in load.lacks.get("a", {})


def test_random_model_names_do_not_grow_the_records_without_bound() -> None:
    async def scenario() -> Load:
        replicas = ReplicaSet(capacity=32)
        await replicas.update(POOL)
        for i in range(3000):
            model = f"random-{i}"
            r = await replicas.acquire(model, set(), deadline=1e18)
            assert r is not None
            replicas.answered(r.name, model, 404 if i % 2 else 200)
            await replicas.release(r.name)
        return replicas.load

    load = asyncio.run(scenario())
    for record in (load.holds, load.lacks):
        assert record and all(len(v) <= routing.MODELS_REMEMBERED for v in record.values())
    # least recently seen out: the latest names are the ones kept
    assert any("random-2999" in v for v in load.lacks.values())
    assert not any("random-1" in v for v in load.lacks.values())


def test_replicas_gone_from_the_pool_are_forgotten() -> None:
    async def scenario() -> Load:
        replicas = ReplicaSet(capacity=32)
        await replicas.update(POOL)
        r = await replicas.acquire("qa", set(), deadline=1e18)
        assert r is not None
        replicas.answered(r.name, "qa", 200)
        await replicas.update(POOL[1:])
        return replicas.load

    load = asyncio.run(scenario())
    assert "replica-0-0" not in load.holds and "replica-0-0" not in load.chosen
    assert load.in_flight["replica-0-0"] == 1  # released when its request ends


def test_upstream_and_continuation_bodies() -> None:
    body = {"model": "qa", "prompt": "hi", "max_tokens": 10, "temperature": 0, "stream": True}
    assert routing.upstream_body(body)["return_token_ids"] is True
    assert "return_token_ids" not in routing.upstream_body({**body, "stream": False})
    cont = routing.continuation_body(body, [5, 6], [7, 8, 9])
    assert cont["prompt"] == [5, 6, 7, 8, 9]
    assert cont["max_tokens"] == 7
    assert cont["temperature"] == 0 and cont["model"] == "qa" and cont["stream"] is True
    chat = {"model": "qa", "messages": [{"role": "user", "content": "x"}], "stream": True}
    assert routing.tokenize_body(routing.CHAT, chat)["add_generation_prompt"] is True  # type: ignore[index]
    assert routing.tokenize_body(routing.COMPLETIONS, {"prompt": [1, 2]}) is None
    assert resumability.resumable(chat) and not resumability.resumable({**chat, "n": 2})
    assert not resumability.resumable({**chat, "logprobs": True})


def test_parse_sse_keeps_unfinished_events() -> None:
    events, rest = routing.parse_sse(b'data: {"a":1}\n\ndata: [DONE]\n\ndata: {"b"')
    assert events == [b'{"a":1}', b"[DONE]"]
    assert rest == b'data: {"b"'


def _chunk(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_relay_strips_token_ids_and_rewrites_continuation_as_chat() -> None:
    state = StreamState(routing.CHAT, {"stream": True, "stream_options": {"include_usage": True}})
    first = routing.relay_chunk(
        state,
        _chunk(
            id="chatcmpl-1",
            object="chat.completion.chunk",
            created=5,
            model="qa",
            prompt_token_ids=[1, 2, 3],
            choices=[
                {"index": 0, "delta": {"role": "assistant", "content": "he"}, "token_ids": [9]}
            ],
        ),
        resumed=False,
    )
    assert first is not None
    sent = json.loads(first[len(b"data: ") :])
    assert "token_ids" not in sent["choices"][0] and "prompt_token_ids" not in sent
    assert list(state.prompt_ids or []) == [1, 2, 3] and list(state.sent_ids) == [9]
    assert state.role_sent
    # the continuation comes from /v1/completions on another replica
    cont = routing.relay_chunk(
        state,
        _chunk(
            id="cmpl-9",
            object="text_completion",
            created=7,
            model="qa",
            choices=[{"index": 0, "text": "llo", "token_ids": [10, 11], "finish_reason": None}],
        ),
        resumed=True,
    )
    assert cont is not None
    doc = json.loads(cont[len(b"data: ") :])
    assert doc["id"] == "chatcmpl-1" and doc["object"] == "chat.completion.chunk"
    assert doc["created"] == 5 and doc["choices"][0]["delta"] == {"content": "llo"}
    assert list(state.sent_ids) == [9, 10, 11]
    usage = routing.relay_chunk(
        state,
        _chunk(id="cmpl-9", choices=[], usage={"prompt_tokens": 6, "completion_tokens": 2}),
        resumed=True,
    )
    assert usage is not None
    counted = json.loads(usage[len(b"data: ") :])["usage"]
    assert counted == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert routing.relay_chunk(state, b"[DONE]", resumed=True) == b"data: [DONE]\n\n"
    assert state.done


def test_a_resume_regenerates_tokens_whose_text_was_held_back() -> None:
    state = StreamState(routing.COMPLETIONS, {"stream": True, "max_tokens": 10})
    for ids, text in [([5], "a"), ([6], ""), ([7], "")]:  # 6, 7: an unfinished character
        routing.relay_chunk(
            state,
            _chunk(id="c", choices=[{"index": 0, "text": text, "token_ids": ids}]),
            resumed=False,
        )
    assert list(state.sent_ids) == [5, 6, 7] and state.committed == 1
    sent = routing.resume_point(state)
    assert sent == [5] and list(state.sent_ids) == [5]
    assert routing.continuation_body(state.body, [1, 2], sent)["max_tokens"] == 9


def test_a_merged_chunk_leaves_its_later_tokens_unsure() -> None:
    state = StreamState(routing.COMPLETIONS, {"stream": True})
    routing.relay_chunk(
        state, _chunk(id="c", choices=[{"text": "a", "token_ids": [4]}]), resumed=False
    )
    assert (state.committed, state.sure, state.text) == (1, 1, "a")
    # three tokens in one chunk (vLLM fell behind): its last ones may be held back
    routing.relay_chunk(
        state, _chunk(id="c", choices=[{"text": "bc", "token_ids": [5, 6, 7]}]), resumed=False
    )
    assert (state.committed, state.sure, state.text) == (4, 2, "abc")
    assert list(routing.commit_candidates(state)) == [4, 3, 2]
    state.committed = 3  # what the replica's detokenizer settles on
    assert routing.resume_point(state) == [4, 5, 6] and state.sure == 3
    assert list(routing.commit_candidates(state)) == [3]


def test_stop_strings_hold_back_text_and_a_resume_starts_before_it() -> None:
    assert routing.hold_back({"stop": "end"}) == 2
    assert routing.hold_back({"stop": ["a", "four"]}) == 3
    assert routing.hold_back({"stop": ["four"], "include_stop_str_in_output": True}) == 0
    assert routing.hold_back({}) == routing.hold_back({"stop": None}) == 0
    body = {"stream": True, "max_tokens": 10, "stop": ["zzzz"]}  # 3 characters held back
    state = StreamState(routing.COMPLETIONS, body)
    # tokens "ab", "cd", "ef": the text lags the tokens by 3 characters
    for ids, text in [([4], ""), ([5], "a"), ([6], "bc")]:
        routing.relay_chunk(
            state, _chunk(id="c", choices=[{"text": text, "token_ids": ids}]), resumed=False
        )
    # every token carries ids: none of their text is surely whole with the client
    assert (state.committed, state.sure, state.text) == (3, 0, "abc")
    assert list(routing.commit_candidates(state)) == [3, 2, 1, 0]
    # what the replica's detokenizer says of each count (the prompt decodes to "P")
    assert not routing.settles_at(state, 3, "P", "Pabcdef")
    assert not routing.settles_at(state, 2, "P", "Pabc\ufffd")  # a character cut in two
    assert routing.settles_at(state, 1, "P", "Pab")
    assert (state.committed, state.sure, state.skip) == (1, 1, 1)
    sent = routing.resume_point(state)
    assert sent == [4]
    assert routing.continuation_body(body, [1], sent)["max_tokens"] == 9
    # the continuation generates "cdef..." again: the "c" the client has is dropped
    out = routing.relay_chunk(
        state, _chunk(id="d", choices=[{"text": "cd", "token_ids": [5]}]), resumed=True
    )
    assert out is not None
    assert json.loads(out[len(b"data: ") :])["choices"][0]["text"] == "d"
    assert (state.text, state.skip, list(state.sent_ids)) == ("abcd", 0, [4, 5])


def test_a_stream_cut_after_its_finish_reason_is_closed_without_another_token() -> None:
    body = {"stream": True, "max_tokens": 2, "stream_options": {"include_usage": True}}
    state = StreamState(routing.COMPLETIONS, body)
    for ids, reason in [([5], None), ([6], "length")]:
        routing.relay_chunk(
            state,
            _chunk(
                id="c",
                object="text_completion",
                created=3,
                model="qa",
                choices=[
                    {
                        "index": 0,
                        "text": "ab",
                        "token_ids": ids,
                        "prompt_token_ids": [1, 2, 3] if ids == [5] else None,
                        "finish_reason": reason,
                    }
                ],
            ),
            resumed=False,
        )
    assert state.finished and not state.done
    usage, done = routing.closing_events(state).split(b"\n\n", 1)
    doc = json.loads(usage[len(b"data: ") :])
    assert doc["id"] == "c" and doc["choices"] == []
    assert doc["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert done == b"data: [DONE]\n\n" and state.done
    # usage already sent, or never asked for: only [DONE]
    assert routing.closing_events(state) == b"data: [DONE]\n\n"
    plain = StreamState(routing.COMPLETIONS, {"stream": True})
    assert routing.closing_events(plain) == b"data: [DONE]\n\n"


def test_the_router_is_ready_once_it_knows_the_replicas_and_not_while_it_drains() -> None:
    async def scenario() -> list[Any]:
        router = Router()
        seen: list[Any] = [(await router.readyz(None)).status]  # type: ignore[arg-type]
        await router.replicas.update([])  # listed: no replica yet is still a place to queue
        seen.append((await router.readyz(None)).status)  # type: ignore[arg-type]
        router.active = 1  # a stream in flight
        started = asyncio.get_running_loop().time()
        seen.append(await router.drain(linger=0.0, limit=0.3))
        seen.append(round(asyncio.get_running_loop().time() - started, 1) >= 0.3)
        seen.append((await router.readyz(None)).status)  # type: ignore[arg-type]
        router.active = 0
        seen.append(await router.drain(linger=0.0, limit=5.0))
        return seen

    # 503 before the first list; 200 after; a drain waits for the stream until its limit and
    # says one was cut; not Ready from then on; with nothing in flight it ends at once.
    assert asyncio.run(scenario()) == [503, 200, 1, True, 503, 0]


C, CHAT = routing.COMPLETIONS, routing.CHAT
OK_PROMPT = {"model": "qa", "prompt": "hi"}
OK_CHAT = {"model": "qa", "messages": [{"role": "user", "content": "hi"}]}
MALFORMED: list[tuple[str, bytes | dict[str, Any], str | None]] = [
    # not a JSON object at all
    (C, b"\xff\xfe{}", None),
    (C, b'{"model": "qa", "prompt": "caf\xe9"}', None),
    (C, b"{not json", None),
    (C, b"", None),
    (C, b'{"model": "qa", "prompt": "hi", "max_tokens": NaN}', None),
    (C, b"[1, 2]", None),
    (C, b'"a string"', None),
    (C, b"null", None),
    # the model
    (C, {"prompt": "hi"}, "model"),
    (C, {**OK_PROMPT, "model": 7}, "model"),
    (C, {**OK_PROMPT, "model": ""}, "model"),
    (CHAT, {**OK_CHAT, "model": ["qa"]}, "model"),
    ("/v1/embeddings", {"input": "hi"}, "model"),
    # streaming switches: strict booleans (vLLM reads "false" as false, Python as true)
    (C, {**OK_PROMPT, "stream": "false"}, "stream"),
    (C, {**OK_PROMPT, "stream": 1}, "stream"),
    (CHAT, {**OK_CHAT, "stream": "true"}, "stream"),
    (C, {**OK_PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    (C, {**OK_PROMPT, "stream": True, "stream_options": "yes"}, "stream_options"),
    (C, {**OK_PROMPT, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options"),
    # counts: integers in range
    (C, {**OK_PROMPT, "n": "x"}, "n"),
    (C, {**OK_PROMPT, "n": 0}, "n"),
    (C, {**OK_PROMPT, "n": -1}, "n"),
    (C, {**OK_PROMPT, "n": 1.5}, "n"),
    (C, {**OK_PROMPT, "n": True}, "n"),
    (C, {**OK_PROMPT, "n": 10**6}, "n"),
    (C, {**OK_PROMPT, "max_tokens": "12"}, "max_tokens"),
    (C, {**OK_PROMPT, "max_tokens": 0}, "max_tokens"),
    (C, {**OK_PROMPT, "max_tokens": -5}, "max_tokens"),
    (C, {**OK_PROMPT, "max_tokens": 10**30}, "max_tokens"),
    (CHAT, {**OK_CHAT, "max_completion_tokens": 2.0}, "max_completion_tokens"),
    (C, {**OK_PROMPT, "min_tokens": -1}, "min_tokens"),
    (C, {**OK_PROMPT, "logprobs": "2"}, "logprobs"),
    (CHAT, {**OK_CHAT, "logprobs": "false"}, "logprobs"),
    (CHAT, {**OK_CHAT, "top_logprobs": -1}, "top_logprobs"),
    # stop strings
    (C, {**OK_PROMPT, "stop": 5}, "stop"),
    (C, {**OK_PROMPT, "stop": ["a", 5]}, "stop"),
    (C, {**OK_PROMPT, "stop": ""}, "stop"),
    (C, {**OK_PROMPT, "stop": {"a": 1}}, "stop"),
    (C, {**OK_PROMPT, "include_stop_str_in_output": "no"}, "include_stop_str_in_output"),
    # switches that make a stream unresumable
    (C, {**OK_PROMPT, "echo": "false"}, "echo"),
    (CHAT, {**OK_CHAT, "tools": {}}, "tools"),
    # the prompt
    (C, {"model": "qa"}, "prompt"),
    (C, {**OK_PROMPT, "prompt": ""}, "prompt"),
    (C, {**OK_PROMPT, "prompt": []}, "prompt"),
    (C, {**OK_PROMPT, "prompt": ["hi", ""]}, "prompt"),
    (C, {**OK_PROMPT, "prompt": [[]]}, "prompt"),
    (C, {**OK_PROMPT, "prompt": [1, -2]}, "prompt"),
    (C, {**OK_PROMPT, "prompt": ["hi", 3]}, "prompt"),
    (C, {**OK_PROMPT, "prompt": {"text": "hi"}}, "prompt"),
    (C, {**OK_PROMPT, "prompt": 42}, "prompt"),
    # the messages
    (CHAT, {"model": "qa"}, "messages"),
    (CHAT, {**OK_CHAT, "messages": []}, "messages"),
    (CHAT, {**OK_CHAT, "messages": "hi"}, "messages"),
    (CHAT, {**OK_CHAT, "messages": [{"content": "hi"}]}, "messages[0]"),
    (CHAT, {**OK_CHAT, "messages": [{"role": "user", "content": "a"}, "b"]}, "messages[1]"),
    (CHAT, {**OK_CHAT, "add_generation_prompt": "yes"}, "add_generation_prompt"),
]


def _raw(body: bytes | dict[str, Any]) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


def test_malformed_requests_are_refused_naming_the_field() -> None:
    for path, body, param in MALFORMED:
        got = validation.read_request(path, _raw(body))
        assert isinstance(got, validation.Refusal), (path, body)
        assert got.status == 400 and got.param == param, (path, body, got)
        error = got.error()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == 400
        assert error["param"] == param and error["message"], (path, body)
        if param is not None:
            assert f"'{param.split('[')[0]}" in error["message"], (body, error)


def test_well_formed_requests_pass_as_they_are() -> None:
    good: list[tuple[str, dict[str, Any]]] = [
        (C, OK_PROMPT),
        (C, {**OK_PROMPT, "prompt": [1, 2, 3], "stream": True, "n": 1, "max_tokens": 5}),
        (C, {**OK_PROMPT, "prompt": ["a", "b"], "stop": "x", "logprobs": 2, "echo": False}),
        (C, {**OK_PROMPT, "prompt": [[1], [2, 3]], "stream": False, "stream_options": None}),
        (C, {**OK_PROMPT, "stream": True, "stream_options": {"include_usage": True}}),
        (C, {**OK_PROMPT, "max_tokens": None, "n": None, "stop": None, "temperature": "0"}),
        (CHAT, {**OK_CHAT, "stop": ["a", "b"], "logprobs": True, "top_logprobs": 2}),
        (CHAT, {**OK_CHAT, "max_completion_tokens": 9, "tools": []}),
        ("/v1/embeddings", {"model": "qa", "input": "hi"}),
        ("/tokenize", {"prompt": "hi"}),
        ("/detokenize", {"tokens": [1, 2]}),
    ]
    for path, body in good:
        assert validation.read_request(path, json.dumps(body).encode()) == body, (path, body)
    # a batch of prompts streams one choice per prompt: passed on, not resumed
    assert not resumability.resumable({**OK_PROMPT, "prompt": ["a", "b"], "stream": True})
    assert resumability.resumable({**OK_PROMPT, "prompt": [1, 2], "stream": True})

"""Which streams the router resumes after a cut, parameter by parameter: a continuation
carries what vLLM applies the same to it, and a stream with anything else is not resumed,
the reason naming the parameter."""

from __future__ import annotations

from typing import Any

import pytest

from cheapspot_operator.router import routing
from cheapspot_operator.router.resumability import CARRIED, FIRST_ONLY, NEUTRAL, unresumable

PROMPT: dict[str, Any] = {"model": "qa", "prompt": "hi", "stream": True, "max_tokens": 9}
CHAT: dict[str, Any] = {
    "model": "qa",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
}

RESUMED: list[dict[str, Any]] = [
    PROMPT,
    CHAT,
    {**PROMPT, "prompt": [1, 2, 3]},
    {**PROMPT, "temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.1},  # no seed
    {**PROMPT, "temperature": 0, "seed": 7},  # greedy: the seed draws nothing
    {**PROMPT, "temperature": 0.0, "seed": 7},
    {**PROMPT, "logit_bias": {"11": -100, "12": 5}},
    {**PROMPT, "allowed_token_ids": [3, 4, 5]},
    {**PROMPT, "repetition_penalty": 1.3},
    {**PROMPT, "frequency_penalty": 0, "presence_penalty": 0.0, "bad_words": []},
    {**PROMPT, "stop": ["x"], "stop_token_ids": [2], "ignore_eos": True, "min_tokens": 3},
    {**PROMPT, "stream_options": {"include_usage": True}, "user": "u", "priority": 1},
    {**CHAT, "max_completion_tokens": 5, "logprobs": False, "top_logprobs": 0, "n": 1},
    {**CHAT, "tools": [], "tool_choice": "none", "parallel_tool_calls": True},
    {**CHAT, "response_format": {"type": "text"}, "chat_template_kwargs": {"x": 1}},
    {**PROMPT, "echo": False, "use_beam_search": False, "logprobs": None},
]

REFUSED: list[tuple[dict[str, Any], str]] = [
    ({**PROMPT, "stream": False}, "not streamed"),
    ({**PROMPT, "prompt": ["a", "b"]}, "'prompt' is a batch"),
    ({**PROMPT, "prompt": ["a"]}, "'prompt' is a batch"),
    ({**PROMPT, "prompt": [[1, 2], [3]]}, "'prompt' is a batch"),
    ({**PROMPT, "n": 2}, "'n'"),
    ({**PROMPT, "logprobs": 0}, "'logprobs'"),  # 0: the sampled token's logprob
    ({**CHAT, "logprobs": True}, "'logprobs'"),
    ({**CHAT, "top_logprobs": 2}, "'top_logprobs'"),
    ({**PROMPT, "echo": True}, "'echo'"),
    ({**PROMPT, "use_beam_search": True}, "'use_beam_search'"),
    ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools'"),
    ({**CHAT, "tool_choice": "required"}, "'tool_choice'"),
    ({**CHAT, "response_format": {"type": "json_object"}}, "'response_format': guided"),
    ({**PROMPT, "response_format": {"type": "json_schema", "json_schema": {}}}, "guided"),
    ({**PROMPT, "structured_outputs": {"regex": "[a-z]+"}}, "'structured_outputs'"),
    ({**PROMPT, "guided_choice": ["yes", "no"]}, "'guided_choice'"),
    ({**PROMPT, "frequency_penalty": 0.5}, "'frequency_penalty'"),
    ({**PROMPT, "presence_penalty": -0.5}, "'presence_penalty'"),
    ({**PROMPT, "frequency_penalty": "0"}, "'frequency_penalty'"),  # vLLM reads 0.0; not 0 here
    ({**PROMPT, "bad_words": ["the cat"]}, "'bad_words'"),
    ({**PROMPT, "temperature": 0.8, "seed": 7}, "'seed' with sampling"),
    ({**PROMPT, "seed": 7}, "'seed' with sampling"),  # the default temperature samples
    ({**PROMPT, "temperature": "0", "seed": 7}, "'seed' with sampling"),
    ({**PROMPT, "return_token_ids": True}, "'return_token_ids'"),
    ({**PROMPT, "truncate_prompt_tokens": 4}, "'truncate_prompt_tokens'"),
    ({**PROMPT, "watermarking": True}, "'watermarking' is not a parameter"),
    ({**PROMPT, "vllm_xargs": {"a": 1}}, "'vllm_xargs' is not a parameter"),
    ({**CHAT, "reasoning_effort": "low"}, "'reasoning_effort' is not a parameter"),
    ({**PROMPT, "suffix": "!"}, "'suffix' is not a parameter"),
]


@pytest.mark.parametrize("body", RESUMED)
def test_streams_the_continuation_honours_are_resumed(body: dict[str, Any]) -> None:
    assert unresumable(body) is None


@pytest.mark.parametrize(("body", "why"), REFUSED)
def test_streams_the_continuation_cannot_honour_are_not_resumed(
    body: dict[str, Any], why: str
) -> None:
    got = unresumable(body)
    assert got is not None and why in got, (body, got)


def test_every_parameter_of_a_resumed_stream_reaches_the_continuation_or_is_used_up() -> None:
    """What the table calls carried is what the continuation body copies: a parameter
    accepted for resuming is never silently left out of the continuation."""
    body = {k: 1 for k in CARRIED}
    doc = routing.continuation_body(body, [5], [6])
    assert set(CARRIED) <= set(doc)
    assert not set(CARRIED) & FIRST_ONLY and not set(CARRIED) & set(NEUTRAL)
    assert not FIRST_ONLY & set(NEUTRAL)
    for carried in ("logit_bias", "allowed_token_ids", "repetition_penalty", "seed"):
        assert carried in CARRIED
    for refused in ("frequency_penalty", "presence_penalty", "bad_words", "response_format"):
        assert refused not in CARRIED

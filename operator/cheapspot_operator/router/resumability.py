"""Which streams the router resumes after a cut, parameter by parameter, as a pure function.

A continuation (:func:`cheapspot_operator.router.routing.continuation_body`) is a new
completions request whose prompt is the original prompt's tokens followed by the tokens
already sent. It gives the answer an undisturbed run gives only where every parameter of the
request means the same for it: a parameter is

* **carried** (:data:`CARRIED`) where vLLM applies it to each generated token whatever came
  before it in the output, or over prompt and output alike (``repetition_penalty`` scales
  the logits of every token seen in either, and the union of the two is the same for the
  continuation). ``logit_bias`` and ``allowed_token_ids`` are per-token constraints of that
  kind. ``seed`` only without sampling (``temperature`` 0): with sampling, the
  continuation's random stream restarts from the seed, so a seeded answer would not be the
  one the same request gives undisturbed;
* **adjusted** (the token limits: ``max_tokens`` and ``min_tokens`` less the tokens sent);
* **used up by the first request** (:data:`FIRST_ONLY`: the prompt or messages and what
  renders them into tokens, the streaming switches, request ids);
* **neutral at its no-op value** (:data:`NEUTRAL`: absent, null, or e.g. ``n`` 1, ``tools``
  empty, ``response_format`` ``{"type": "text"}``) and otherwise a reason not to resume:
  vLLM applies it against the generated tokens only (``frequency_penalty``,
  ``presence_penalty``, ``bad_words``, whose multi-token words it matches against the
  output), against state built from the text generated (guided decoding:
  ``response_format``, ``structured_outputs``, tool calls), or the stream carries what a
  continuation cannot rebuild (logprobs, several choices, an echo of the prompt).

Anything else, a parameter not in these tables, is not resumed: what the router does not
know it cannot carry, and a continuation without it would silently drop it. A stream not
resumed is passed through as it is, and cut part-way ends with an error event that says why
it was not resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

CARRIED = (
    "model",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "repetition_penalty",
    "logit_bias",
    "allowed_token_ids",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "min_tokens",
    "length_penalty",
    "priority",
    "cache_salt",
    "user",
)
"""Parameters copied into a continuation as they are (``min_tokens`` then reduced by the
tokens sent)."""

FIRST_ONLY = frozenset(
    {
        "prompt",
        "messages",
        "chat_template",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "add_special_tokens",
        "stream",
        "stream_options",
        "stream_interval",
        "max_tokens",
        "max_completion_tokens",
        "parallel_tool_calls",
        "request_id",
        "session_id",
    }
)
"""Parameters the first request uses up: the prompt and what turns it into tokens (a
continuation starts from the prompt's token ids), the streaming switches (a continuation
always streams, with usage, and the router rewrites its chunks), the token limits (reduced
in the continuation), request ids (a continuation is another request)."""


def _off(value: Any) -> bool:
    return value is None or value is False


def _zero(value: Any) -> bool:
    return value is None or (type(value) in (int, float) and value == 0)


def _empty(value: Any) -> bool:
    return value is None or value in ([], {})


def _one(value: Any) -> bool:
    return value is None or (type(value) is int and value == 1)


GUIDED = (
    "guided decoding: the grammar's state follows the text generated, which a continuation"
    " has as prompt"
)
PENALTY = "vLLM counts it over the generated tokens only, and a continuation has those as prompt"
WORDS = "vLLM matches a word of several tokens against the generated tokens only"

NEUTRAL: Mapping[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_one, "several choices are streamed interleaved, and a continuation has one"),
    "logprobs": (_off, "a continuation's logprobs would be of another request"),
    "top_logprobs": (_zero, "a continuation's logprobs would be of another request"),
    "prompt_logprobs": (_off, "a continuation's logprobs would be of another request"),
    "logprob_token_ids": (_empty, "a continuation's logprobs would be of another request"),
    "return_tokens_as_token_ids": (_off, "it shapes logprobs, which are not resumed"),
    "return_token_ids": (_off, "the client's token ids are the router's to resume with"),
    "echo": (_off, "the prompt echoed is in the first stream only"),
    "use_beam_search": (_off, "beam search keeps several sequences a continuation has not"),
    "tools": (_empty, "tool calls are parsed from the whole answer, " + GUIDED),
    "tool_choice": (lambda v: v in (None, "none", "auto"), GUIDED),
    "response_format": (lambda v: v is None or v == {"type": "text"}, GUIDED),
    "structured_outputs": (_empty, GUIDED),
    "guided_json": (_empty, GUIDED),
    "guided_regex": (_empty, GUIDED),
    "guided_choice": (_empty, GUIDED),
    "guided_grammar": (_empty, GUIDED),
    "frequency_penalty": (_zero, PENALTY),
    "presence_penalty": (_zero, PENALTY),
    "bad_words": (_empty, WORDS),
    "truncate_prompt_tokens": (_off, "a continuation's prompt would be truncated again"),
}
"""Parameters that stop a stream being resumed unless they have their no-op value, and why."""


def unresumable(body: Mapping[str, Any]) -> str | None:
    """Why the router does not resume ``body``'s stream if it is cut (naming the parameter),
    or None: it resumes it. ``body`` has passed
    :func:`~cheapspot_operator.router.validation.read_request`."""
    if body.get("stream") is not True:
        return "it is not streamed"
    prompt = body.get("prompt")
    if isinstance(prompt, list) and not all(type(t) is int for t in prompt):
        return "'prompt' is a batch of prompts, each its own choice"
    for key, value in body.items():
        if key in FIRST_ONLY or key in CARRIED:
            continue
        rule = NEUTRAL.get(key)
        if rule is None:
            return f"'{key}' is not a parameter the router carries into a continuation"
        neutral, why = rule
        if not neutral(value):
            return f"'{key}': {why}"
    if body.get("seed") is not None and not _sampling_off(body.get("temperature")):
        return (
            "'seed' with sampling: a continuation restarts the seeded random stream, so the"
            " answer would not be the one the seed gives"
        )
    return None


def _sampling_off(temperature: Any) -> bool:
    return type(temperature) in (int, float) and temperature == 0


def resumable(body: Mapping[str, Any]) -> bool:
    """Whether the router resumes ``body``'s stream if it is cut: :func:`unresumable`."""
    return unresumable(body) is None

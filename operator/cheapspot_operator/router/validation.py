"""Reading a request the router relays, as pure functions: the body parsed and the fields the
router reads checked the way the OpenAI API checks them, so a malformed request gets a 400
that names its field (``param``) and never reaches a replica; and OpenAI's error shape for
every error the router answers itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cheapspot_operator.router.routing import CHAT, COMPLETIONS


def openai_error(
    message: str, status: int, kind: str = "server_error", param: str | None = None
) -> dict[str, Any]:
    """An error in OpenAI's format (``code``: the HTTP status, as vLLM's errors have it)."""
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass(frozen=True)
class Refusal:
    """A client request refused before any replica sees it."""

    status: int
    message: str
    param: str | None = None

    def error(self) -> dict[str, Any]:
        return openai_error(self.message, self.status, "invalid_request_error", self.param)


class _Invalid(Exception):  # noqa: N818
    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


MAX_N = 128
"""The most choices one request may ask for (OpenAI's limit)."""
MAX_INT = 2**31 - 1
"""The largest token count the router passes on."""
_MODEL_REQUIRED = (COMPLETIONS, CHAT, "/v1/embeddings")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def read_request(path: str, raw: bytes) -> dict[str, Any] | Refusal:
    """A client's POST body, checked the way OpenAI's API checks it, or why it is refused
    (400, naming the field). Checked: every field the router reads to route, resume or pass
    on a request (``model``, ``stream``, ``stream_options``, ``n``, the token limits,
    ``stop``, the prompt or messages, and the switches that make a stream unresumable), so
    that the router and vLLM read the same request: vLLM coerces ``"false"`` to false where
    the router would see a true string. Everything else is vLLM's to check."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Refusal(400, f"the request body is not UTF-8: {exc.reason} at byte {exc.start}")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        return Refusal(400, f"the request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return Refusal(400, f"the request body must be a JSON object, not {_kind(body)}")
    try:
        _check(path, body)
    except _Invalid as exc:
        return Refusal(400, str(exc), exc.param)
    return body


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise _Invalid(name, f"'{name}' must be {what}, not {_kind(value)}: {value!r:.80}")
    return value


def _count(body: Mapping[str, Any], name: str, least: int, most: int = MAX_INT) -> None:
    value = _optional(body, name, int, "an integer")
    if value is not None and not least <= value <= most:
        bound = f"at least {least}" if value < least else f"at most {most}"
        raise _Invalid(name, f"'{name}' must be {bound}, not {value}")


def _check(path: str, body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if path in _MODEL_REQUIRED and model is None:
        raise _Invalid("model", "'model' is required: the name of the model or adapter to use")
    model = _optional(body, "model", str, "a string")
    if model is not None and not model:
        raise _Invalid("model", "'model' must not be empty")
    stream = _optional(body, "stream", bool, "a boolean")
    options = _optional(body, "stream_options", dict, "an object")
    if options is not None:
        if not stream:
            raise _Invalid(
                "stream_options", "'stream_options' is only allowed when 'stream' is true"
            )
        usage = options.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            raise _Invalid(
                "stream_options",
                f"'stream_options.include_usage' must be a boolean, not {_kind(usage)}",
            )
    if path not in (COMPLETIONS, CHAT):
        return
    _count(body, "n", 1, MAX_N)
    _count(body, "max_tokens", 1)
    _count(body, "max_completion_tokens", 1)
    _count(body, "min_tokens", 0)
    _count(body, "top_logprobs", 0)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _Invalid("stop", "'stop' must be a string or an array of strings")
        if not all(stops):
            raise _Invalid("stop", "'stop' strings must not be empty")
    for name in ("include_stop_str_in_output", "echo", "use_beam_search", "ignore_eos"):
        _optional(body, name, bool, "a boolean")
    _optional(body, "tools", list, "an array")
    if path == CHAT:
        _optional(body, "logprobs", bool, "a boolean")
        for name in ("add_generation_prompt", "continue_final_message"):
            _optional(body, name, bool, "a boolean")
        _optional(body, "chat_template", str, "a string")
        _optional(body, "chat_template_kwargs", dict, "an object")
        _check_messages(body.get("messages"))
    else:
        _count(body, "logprobs", 0)
        _optional(body, "add_special_tokens", bool, "a boolean")
        _check_prompt(body.get("prompt"))


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise _Invalid("messages", "'messages' is required")
    if not isinstance(messages, list):
        raise _Invalid("messages", f"'messages' must be an array, not {_kind(messages)}")
    if not messages:
        raise _Invalid("messages", "'messages' must not be empty")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _Invalid(f"messages[{i}]", f"'messages[{i}]' must be an object with a 'role'")


def _check_prompt(prompt: Any) -> None:
    what = "a string, an array of strings, of token ids, or of arrays of token ids"
    if prompt is None:
        raise _Invalid("prompt", "'prompt' is required")
    if isinstance(prompt, str):
        if not prompt:
            raise _Invalid("prompt", "'prompt' must not be empty")
        return
    if not isinstance(prompt, list):
        raise _Invalid("prompt", f"'prompt' must be {what}, not {_kind(prompt)}")
    if not prompt:
        raise _Invalid("prompt", "'prompt' must not be empty")
    if all(_is_int(t) for t in prompt):
        if not all(0 <= t <= MAX_INT for t in prompt):
            raise _Invalid("prompt", "'prompt' token ids must be between 0 and 2147483647")
        return
    if all(isinstance(p, str) for p in prompt):
        if not all(prompt):
            raise _Invalid("prompt", "'prompt' strings must not be empty")
        return
    if all(isinstance(p, list) for p in prompt):
        for p in prompt:
            if not p or not all(_is_int(t) and 0 <= t <= MAX_INT for t in p):
                raise _Invalid("prompt", "'prompt' arrays must be non-empty token ids")
        return
    raise _Invalid("prompt", f"'prompt' must be {what}")

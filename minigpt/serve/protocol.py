"""The OpenAI wire format: request bodies checked into typed requests, errors as OpenAI's
`{"error": {"message", "type", "param", "code"}}`, the chat template, and the response documents.

Every way a body can be wrong (not JSON, not an object, a wrong type, a value out of range, an
unknown field, an unknown model, a prompt that does not fit the context) raises ApiError with the
HTTP status and the field it names, never anything else: the app turns it into a 4xx answer.

The chat template, for base models that were never taught one: each message on its own line as
`role: content`, then `assistant:` for the model to continue; generation also stops at a new line
that starts another turn (`\nuser:`, `\nsystem:`), besides any `stop` the request gives.
"""

import math
import time
import uuid
from dataclasses import dataclass

from minigpt.errors import MiniGPTError

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one completions request
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
CHAT_ROLES = ("system", "user", "assistant")
CHAT_STOPS = ("\nuser:", "\nsystem:")


class ApiError(Exception):
    """A request the server refuses: HTTP status, OpenAI error type, the field, a code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """How each choice's tokens are drawn and when they stop."""

    max_tokens: int
    temperature: float
    top_p: float | None
    stop: tuple[str, ...]
    seed: int | None


@dataclass(frozen=True)
class GenerationRequest:
    """A checked completions or chat request: its prompts as token ids, n choices per prompt."""

    chat: bool
    prompts: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str, ...]  # for echo
    n: int
    sampling: Sampling
    stream: bool
    include_usage: bool
    echo: bool

    @property
    def sequences(self) -> int:
        return len(self.prompts) * self.n


COMMON_KEYS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
               "stream_options", "user", "frequency_penalty", "presence_penalty", "logprobs"}
COMPLETION_KEYS = COMMON_KEYS | {"prompt", "echo", "best_of", "suffix"}
CHAT_KEYS = COMMON_KEYS | {"messages", "max_completion_tokens", "top_logprobs"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bad(message: str, param: str | None, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def _optional(body: dict, key: str, default):
    value = body.get(key, default)
    return default if value is None else value


def _int_in(body: dict, key: str, default, low: int, high: int | None = None):
    value = _optional(body, key, default)
    if value is default and default is None:
        return None
    if not _is_int(value):
        raise _bad(f"'{key}' must be an integer, got {type(value).__name__}", key, "invalid_type")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise _bad(f"'{key}' must be {bound}, got {value}", key)
    return value


def _number_in(body: dict, key: str, default: float, low: float, high: float,
               low_open: bool = False) -> float:
    value = _optional(body, key, default)
    if not _is_number(value):
        raise _bad(f"'{key}' must be a finite number, got {type(value).__name__}", key,
                   "invalid_type")
    if value > high or value < low or (low_open and value == low):
        side = "(" if low_open else "["
        raise _bad(f"'{key}' must be in {side}{low:g}, {high:g}], got {value}", key)
    return float(value)


def _bool(body: dict, key: str) -> bool:
    value = _optional(body, key, False)
    if not isinstance(value, bool):
        raise _bad(f"'{key}' must be true or false, got {type(value).__name__}", key,
                   "invalid_type")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise _bad(f"'stop' takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    if any(s == "" for s in stops):
        raise _bad("'stop' strings must not be empty", "stop")
    return tuple(stops)


def _unsupported(body: dict, keys: set[str]) -> None:
    unknown = sorted(set(body) - keys)
    if unknown:
        raise _bad(f"unrecognized request argument: {unknown[0]}", unknown[0],
                   "unrecognized_argument")
    for key in ("frequency_penalty", "presence_penalty"):
        if _optional(body, key, 0) != 0:
            raise _bad(f"'{key}' is not supported by this server (give 0 or leave it out)", key,
                       "unsupported_value")
    if _optional(body, "logprobs", False) not in (False, 0):
        raise _bad("'logprobs' is not supported by this server", "logprobs", "unsupported_value")
    if _optional(body, "best_of", 1) != 1:
        raise _bad("'best_of' is not supported by this server (give 1 or leave it out)",
                   "best_of", "unsupported_value")
    if body.get("suffix") is not None:
        raise _bad("'suffix' is not supported by this server", "suffix", "unsupported_value")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string", "user", "invalid_type")


def check_model(body: dict, model_name: str) -> None:
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("'model' is required and must be a string (GET /v1/models lists it)", "model",
                   "invalid_type" if "model" in body else "missing_required_parameter")
    if model != model_name:
        raise ApiError(404, f"the model '{model[:200]}' does not exist; this server serves "
                            f"'{model_name}'", "model", "model_not_found")


def _stream_options(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _bad("'stream_options' is only allowed with 'stream': true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _bad("'stream_options' must be an object with 'include_usage'", "stream_options",
                   "invalid_type")
    return _bool(options, "include_usage")


def _token_ids(ids: list, vocab_size: int, param: str) -> tuple[int, ...]:
    for t in ids:
        if not _is_int(t):
            raise _bad(f"'{param}' token ids must be integers", param, "invalid_type")
        if not 0 <= t < vocab_size:
            raise _bad(f"'{param}': {t} is not a token id of this model (0..{vocab_size - 1})",
                       param)
    return tuple(ids)


def _encode(tokenizer, text: str, param: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in tokenizer.encode(text))
    except MiniGPTError as e:  # a run with no tokenizer: token ids only
        raise _bad(f"'{param}' cannot be encoded: {e}", param, "unencodable_prompt") from None


def completion_prompts(body: dict, tokenizer, vocab_size: int):
    """The prompt field as token ids and texts: a string, a list of strings, a list of token
    ids, or a list of lists of token ids."""
    prompt = body.get("prompt")
    if prompt is None:
        raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        return [_encode(tokenizer, prompt, "prompt")], [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise _bad("'prompt' must be a string, a list of strings, or token ids", "prompt",
                   "invalid_type")
    if all(isinstance(p, str) for p in prompt):
        return [_encode(tokenizer, p, "prompt") for p in prompt], list(prompt)
    if all(_is_int(p) for p in prompt):
        ids = _token_ids(prompt, vocab_size, "prompt")
        return [ids], [tokenizer.decode(ids)]
    if all(isinstance(p, list) for p in prompt):
        lists = [_token_ids(p, vocab_size, "prompt") for p in prompt]
        return lists, [tokenizer.decode(ids) for ids in lists]
    raise _bad("'prompt' must be a string, a list of strings, or token ids (not a mixture)",
               "prompt", "invalid_type")


def chat_text(messages) -> str:
    """The plain chat template: `role: content` lines, then `assistant:`."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages",
                   "invalid_type" if messages is not None else "missing_required_parameter")
    lines = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{where}' must be an object with 'role' and 'content'", where,
                       "invalid_type")
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise _bad(f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}", f"{where}.role")
        if isinstance(content, list):  # OpenAI's content parts: text parts only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise _bad(f"'{where}.content' parts must be text parts", f"{where}.content",
                           "invalid_type")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"'{where}.content' must be a string", f"{where}.content", "invalid_type")
        lines.append(f"{role}: {content}\n")
    return "".join(lines) + "assistant:"


def parse(body, chat: bool, model_name: str, tokenizer, vocab_size: int,
          block_size: int) -> GenerationRequest:
    """A checked request from a decoded JSON body, or ApiError naming the first fault."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    check_model(body, model_name)
    _unsupported(body, CHAT_KEYS if chat else COMPLETION_KEYS)
    if chat:
        text = chat_text(body.get("messages"))
        prompts, texts = [_encode(tokenizer, text, "messages")], [text]
        echo = False
    else:
        prompts, texts = completion_prompts(body, tokenizer, vocab_size)
        echo = _bool(body, "echo")
    if len(prompts) > MAX_PROMPTS:
        raise _bad(f"'prompt' takes at most {MAX_PROMPTS} prompts, got {len(prompts)}", "prompt")
    param = "messages" if chat else "prompt"
    if any(len(p) == 0 for p in prompts):
        raise _bad(f"'{param}' is empty: give at least one token", param)
    n = _int_in(body, "n", 1, 1, MAX_N)
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    longest = max(len(p) for p in prompts)
    key = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    default = max(block_size - longest, 1) if chat else DEFAULT_COMPLETION_TOKENS
    max_tokens = _int_in(body, key, default, 1)
    if longest + max_tokens > block_size:
        raise _bad(f"This model's maximum context length is {block_size} tokens. However, you "
                   f"requested {longest + max_tokens} tokens ({longest} in the {param}, "
                   f"{max_tokens} in the completion). Please reduce the length of the {param} or "
                   f"of the completion.", param, "context_length_exceeded")
    temperature = _number_in(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number_in(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _int_in(body, "seed", None, 0, 2**63 - 1)
    stops = _stops(body) + (CHAT_STOPS if chat else ())
    sampling = Sampling(max_tokens, temperature, None if top_p == 1.0 else top_p, stops, seed)
    return GenerationRequest(chat, tuple(prompts), tuple(texts), n, sampling, stream,
                             include_usage, echo)


# ---- responses ---------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())


def choice(chat: bool, index: int, text: str, finish_reason: str | None) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chunk_choice(chat: bool, index: int, text: str | None, finish_reason: str | None,
                 first: bool = False) -> dict:
    if chat:
        delta = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}


def document(chat: bool, rid: str, created: int, model: str, choices: list, usage: dict | None,
             chunk: bool = False) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    doc = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if usage is not None or chunk:
        doc["usage"] = usage
    return doc

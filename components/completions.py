"""The OpenAI completions API as gptforge serves it: parsing a request, and the shapes of the answers.

Pure (pydantic, no Ray or HTTP server), so every refusal is tested without Serve.

Every field of OpenAI's `POST /v1/completions` is either honoured or refused with a
400 naming it; an unknown field is refused too, so nothing is silently ignored:

- honoured: `prompt` (a string or a list of strings), `model`, `max_tokens`,
  `temperature`, `top_p`, `top_k` (not OpenAI's, common in compatible servers),
  `stop` (string or up to 4 strings), `n`, `seed`, `echo`, `logprobs` (0..5),
  `stream`, `stream_options.include_usage`, `user` (an end-user id; it does not
  change the output and is only accepted);
- accepted only at their no-op values: `best_of` (null or equal to `n`),
  `frequency_penalty` and `presence_penalty` (0), `logit_bias` (empty), `suffix` (null);
- refused: token-id prompts, anything else.

Every string of a request (keys included) must be UTF-8 text: JSON's `\\ud800` escape gives a lone
surrogate, which neither the tokenizer nor a UTF-8 answer can carry, so it is a 400 naming the field.
"""
from __future__ import annotations

import collections
import json
import math
import time
import uuid
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from components.config import ServeConfig
from components.rows import Delta, LogprobEntry, Sampling
from components.sampling import (
    MAX_SEED, MAX_TEMPERATURE, MIN_TOP_P, seed_problem, temperature_problem, top_p_problem,
)

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_LOGPROBS = 5  # OpenAI's limit on `logprobs`


class RequestError(Exception):
    """A request the endpoint refuses; answered as an OpenAI error with `status_code`."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None,
                 error_type: str = "invalid_request_error", headers: dict | None = None):
        # A message quoting the client's text must still encode as UTF-8, or answering it would fail.
        message, param = _utf8(message), param if param is None else _utf8(param)
        super().__init__(message)
        self.status_code, self.message, self.param, self.code = status_code, message, param, code
        self.error_type, self.headers = error_type, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None


Number = StrictFloat | StrictInt


def _bounds(default, **schema):
    """A field whose JSON schema (the endpoint's /openapi.json) states the fixed bounds `_check_values` enforces;
    the schema only documents them, so a violation is still reported in the endpoint's own words."""
    return Field(default, json_schema_extra=schema)


class SamplingFields(BaseModel):
    """The fields every generating endpoint shares. Strict types: `"5"` is not a number and `1` is not
    `true`, as in OpenAI's API."""

    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    temperature: Number | None = _bounds(1.0, minimum=0, maximum=MAX_TEMPERATURE)
    top_p: Number | None = _bounds(1.0, minimum=MIN_TOP_P, maximum=1)
    top_k: StrictInt | None = _bounds(None, minimum=1)
    stop: StrictStr | list[StrictStr] | None = _bounds(None, minLength=1, maxItems=MAX_STOP)
    n: StrictInt | None = _bounds(1, minimum=1)
    seed: StrictInt | None = _bounds(None, minimum=0, maximum=MAX_SEED)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    frequency_penalty: Number | None = _bounds(0, minimum=0, maximum=0)
    presence_penalty: Number | None = _bounds(0, minimum=0, maximum=0)
    logit_bias: dict[StrictStr, Number] | None = _bounds(None, maxProperties=0)

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def choices_per_prompt(self) -> int:
        return 1 if self.n is None else self.n


class CompletionRequest(SamplingFields):
    """The request body of `POST /v1/completions`."""

    prompt: StrictStr | list[StrictStr] = _bounds(..., minLength=1, minItems=1)
    max_tokens: StrictInt | None = _bounds(16, minimum=1)
    echo: StrictBool | None = False
    logprobs: StrictInt | None = _bounds(None, minimum=0, maximum=MAX_LOGPROBS)
    best_of: StrictInt | None = _bounds(None, minimum=1)
    suffix: StrictStr | None = _bounds(None, maxLength=0)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


def parse_request(body: bytes, limits: ServeConfig) -> CompletionRequest:
    """The validated request, or RequestError: 413 for a body over the limit, 400 naming the field otherwise.

    `limits` is the experiment's `serve:` section: what one request may ask for
    (`max_body_bytes`, `max_prompt_chars`, `max_tokens_cap`, `max_choices`).
    """
    data = read_body(body, limits)
    if isinstance(data.get("prompt"), list) and any(not isinstance(p, str) for p in data["prompt"]):
        raise RequestError(400, "prompt: token-id prompts are not supported; send a string or a list of strings",
                           param="prompt")
    request = validate_body(CompletionRequest, data)
    _check_values(request, limits)
    return request


def read_body(body: bytes, limits: ServeConfig) -> dict:
    """The body as a JSON object of UTF-8 text, or RequestError (413 over `serve.max_body_bytes`, else 400)."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"the request body has {len(body)} bytes, more than the limit of "
                                f"{limits.max_body_bytes} (serve.max_body_bytes)", code="request_too_large")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise RequestError(400, f"the request body is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _check_text(data)
    return data


def validate_body(model: type[BaseModel], data: dict):
    """`data` as an instance of `model`, or RequestError (400) naming every field pydantic refused."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not isinstance(p, int)) or None
        param = param.split(".")[0] if param else None
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {_pydantic_message(e)}" for e in error.errors()]
        raise RequestError(400, "; ".join(problems)[:2000], param=param) from None


def _utf8(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_text(data: dict) -> None:
    """Refuse, naming each, every string of the body (keys too) that is not UTF-8 text."""
    problems: list[tuple[str | None, str]] = []  # (top-level field, or None for a field's name; what is wrong)
    # (top-level field, path, value), walked in a loop: nesting as deep as JSON allows cannot overflow the stack.
    todo = collections.deque((_utf8(key), _utf8(key), item) for key, item in data.items())
    todo.extendleft((None, "a field name", key) for key in data)
    while todo and len(problems) < 10:
        field, path, value = todo.popleft()
        if isinstance(value, dict):
            todo.extend((field, f"{path} (a key)", key) for key in value)
            todo.extend((field, f"{path}.{_utf8(key)}", item) for key, item in value.items())
        elif isinstance(value, list):
            todo.extend((field, f"{path}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as error:
                problems.append((field, f"{path}: not valid UTF-8 text (a lone surrogate, "
                                        f"U+{ord(value[error.start]):04X}, at character {error.start})"))
    if problems:
        raise RequestError(400, "; ".join(why for _, why in problems)[:2000],
                           param=problems[0][0])


def _pydantic_message(e: dict) -> str:
    if e["type"] == "extra_forbidden":
        return "unknown field; gptforge refuses fields it does not honour"
    return e["msg"]


def _check_values(r: CompletionRequest, limits: ServeConfig) -> None:
    """Every problem of the values at once, each naming its field."""
    problems: list[tuple[str, str]] = []
    prompts = r.prompts
    if not prompts:
        problems.append(("prompt", "must be a string or a non-empty list of strings"))
    for i, p in enumerate(prompts):
        name = "prompt" if isinstance(r.prompt, str) else f"prompt[{i}]"
        if not p:
            problems.append((name, "must not be empty"))
        elif len(p) > limits.max_prompt_chars:
            problems.append((name, f"{len(p)} characters, more than the limit of {limits.max_prompt_chars}"))
    if r.max_tokens is not None and not 1 <= r.max_tokens <= limits.max_tokens_cap:
        problems.append(("max_tokens", f"must be between 1 and {limits.max_tokens_cap}, got {r.max_tokens}"))
    if r.n is not None and r.n < 1:
        problems.append(("n", f"must be at least 1, got {r.n}"))
    elif len(prompts) * r.choices_per_prompt > limits.max_choices:
        problems.append(("n", f"{len(prompts)} prompt(s) x n={r.choices_per_prompt} is more than "
                              f"{limits.max_choices} completions in one request (serve.max_choices)"))
    problems += sampling_problems(r)
    if r.logprobs is not None and not 0 <= r.logprobs <= MAX_LOGPROBS:
        problems.append(("logprobs", f"must be between 0 and {MAX_LOGPROBS}, got {r.logprobs}"))
    if r.best_of is not None and r.best_of != r.choices_per_prompt:
        problems.append(("best_of", f"not supported (only best_of equal to n, here {r.choices_per_prompt})"))
    if r.suffix:
        problems.append(("suffix", "not supported (insertion is not available)"))
    refuse(problems)


def sampling_problems(r: SamplingFields) -> list[tuple[str, str]]:
    """(field, what is wrong) for each shared field a request sets outside what gptforge honours."""
    problems: list[tuple[str, str]] = []
    if r.temperature is not None and temperature_problem(_as_float(r.temperature)):
        problems.append(("temperature", temperature_problem(_as_float(r.temperature))))
    if r.top_p is not None and top_p_problem(_as_float(r.top_p)):
        problems.append(("top_p", top_p_problem(_as_float(r.top_p))))
    if r.top_k is not None and r.top_k < 1:
        problems.append(("top_k", f"must be at least 1, got {r.top_k}"))
    if r.seed is not None and seed_problem(r.seed):
        problems.append(("seed", seed_problem(r.seed)))
    stops = r.stops
    if len(stops) > MAX_STOP:
        problems.append(("stop", f"at most {MAX_STOP} sequences, got {len(stops)}"))
    if any(not s for s in stops):
        problems.append(("stop", "a stop sequence must not be empty"))
    if any(len(s) > 200 for s in stops):
        problems.append(("stop", "a stop sequence may have at most 200 characters"))
    if r.stream_options is not None and not r.stream:
        problems.append(("stream_options", "only allowed with stream=true"))
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(r, name)
        if value not in (None, 0):
            problems.append((name, f"not supported (only 0), got {value}"))
    if r.logit_bias:
        problems.append(("logit_bias", "not supported (only an empty object)"))
    return problems


def refuse(problems: list[tuple[str, str]]) -> None:
    """A 400 naming every problem, its `param` the first one's field (`prompt[1]` is `prompt`); none: nothing."""
    if problems:
        raise RequestError(400, "; ".join(f"{name}: {why}" for name, why in problems),
                           param=problems[0][0].split("[")[0])


def _as_float(value: float | int) -> float:
    """A JSON number as a float; an integer too large for one (JSON allows 1 followed by 400 zeros) is infinite."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def sampling_of(r: CompletionRequest) -> Sampling:
    return Sampling(
        max_tokens=16 if r.max_tokens is None else r.max_tokens,
        temperature=1.0 if r.temperature is None else float(r.temperature),
        top_p=1.0 if r.top_p is None else float(r.top_p),
        top_k=r.top_k,
        stop=r.stops,
        logprobs=r.logprobs,
        echo=bool(r.echo),
    )


def check_model(r: SamplingFields, model_id: str) -> None:
    """A request may leave `model` out, or name the served version (`tiny:v3`) or its registered model (`tiny`)."""
    if r.model is not None and r.model not in (model_id, model_id.split(":")[0]):
        raise RequestError(404, f"The model {r.model!r} does not exist on this endpoint; it serves "
                                f"{model_id!r} (GET /v1/models)", param="model", code="model_not_found")


def check_context(prompt_tokens: list[int], max_tokens: int, block_size: int, single: bool) -> None:
    """Refuse prompts that, with `max_tokens`, do not fit in the model's context (OpenAI does the same)."""
    for i, n in enumerate(prompt_tokens):
        name = "prompt" if single else f"prompt[{i}]"
        if n == 0:
            raise RequestError(400, f"{name}: encodes to no tokens", param="prompt")
        if n + max_tokens > block_size:
            raise RequestError(400, f"{name}: {n} tokens + max_tokens {max_tokens} is more than the model's "
                                    f"context of {block_size} tokens; shorten the prompt or lower max_tokens",
                               param="prompt", code="context_length_exceeded")


# ------------------------------------------------------------------ answers


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def logprobs_json(entries: list[LogprobEntry]) -> dict:
    """OpenAI's (legacy completions) logprobs object."""
    return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [e.top for e in entries], "text_offset": [e.offset for e in entries]}


def completion_body(cid: str, model_id: str, choices: list[list[Delta]], want_logprobs: bool,
                    prompt_tokens: int) -> dict:
    """The whole answer from every choice's deltas."""
    out, completion_tokens = [], 0
    for index, deltas in enumerate(choices):
        entries = [e for d in deltas for e in d.logprobs]
        completion_tokens += sum(d.completion_tokens for d in deltas)
        out.append({"text": "".join(d.text for d in deltas), "index": index,
                    "logprobs": logprobs_json(entries) if want_logprobs else None,
                    "finish_reason": deltas[-1].finish_reason if deltas else None})
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": out, "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(cid: str, model_id: str, index: int, delta: Delta, want_logprobs: bool) -> dict:
    """One server-sent event: the same shape as the answer, with one choice's new text."""
    return {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_id,
            "choices": [{"text": delta.text, "index": index,
                         "logprobs": logprobs_json(delta.logprobs) if want_logprobs else None,
                         "finish_reason": delta.finish_reason}]}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Answer:
    """How one request's answer is written, whole or as server-sent events (here: `text_completion`)."""

    model_id: str
    want_logprobs: bool
    id: str = field(default_factory=new_id)
    chunk_object = "text_completion"  # the `object` of a streamed chunk

    def body(self, choices: list[list[Delta]], prompt_tokens: int) -> dict:
        return completion_body(self.id, self.model_id, choices, self.want_logprobs, prompt_tokens)

    def opening(self, choices: int) -> list[dict]:
        """The events a stream starts with, before any text (none for completions)."""
        return []

    def chunks(self, index: int, delta: Delta) -> list[dict]:
        """The events that carry one delta of choice `index`."""
        return [chunk_body(self.id, self.model_id, index, delta, self.want_logprobs)]

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """The last event with `stream_options.include_usage`: no choices, the request's usage."""
        return {"id": self.id, "object": self.chunk_object, "created": int(time.time()), "model": self.model_id,
                "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

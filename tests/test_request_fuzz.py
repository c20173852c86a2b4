"""Property-based tests of the request parser: any JSON in any field is accepted or refused with a 4xx.

The generated values are arbitrary JSON (any type, huge integers, NaN and infinities, lone
surrogates, deep nesting) plus near-valid values for each field, so both the type checks and
the value checks behind them are reached; the chat body (messages) is fuzzed the same way, through
to its rendered prompt. What the parser accepts must then work: the prompts
tokenize, the seed seeds a torch.Generator, and the sampler draws a token with the settings.
"""
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from components.chat import CHAT_TOKENS, CHATML_TEMPLATE
from components.chat_completions import chat_prompt, parse_chat_request
from components.completions import RequestError, parse_request, sampling_of
from components.config import ServeConfig
from components.rows import _sample
from components.sampling import MAX_TEMPERATURE, MIN_TOP_P
from components.tokenizer import train_tokenizer

LIMITS = ServeConfig(max_body_bytes=8192, max_prompt_chars=200, max_tokens_cap=32, max_choices=4)

# Text with every code point, lone surrogates included (JSON's "\ud800" escape gives one).
TEXT = st.text(st.characters(exclude_categories=()), max_size=20)
NUMBERS = st.one_of(
    st.integers(), st.integers(min_value=-(10**400), max_value=10**400), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.0, -0.0, 1e-46, 5e-324, 1e-9, 1e-6, 1e-3, 2.0, 2**63, 2**64, 1e308]),
)
JSON = st.recursive(st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
                    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(TEXT, inner, max_size=5)),
                    max_leaves=12)
# Values of the right shape for each field, so that the checks past the type checks run too.
NEAR = {
    "prompt": st.one_of(TEXT, st.lists(TEXT, max_size=6)),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=6)),
    "stream_options": st.one_of(st.just({"include_usage": True}), st.dictionaries(TEXT, JSON, max_size=2)),
    "logit_bias": st.dictionaries(TEXT, NUMBERS, max_size=2),
    "echo": st.booleans(), "stream": st.booleans(),
}
FIELDS = ["prompt", "model", "max_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed", "echo", "logprobs",
          "stream", "stream_options", "user", "best_of", "frequency_penalty", "presence_penalty", "logit_bias",
          "suffix"]


# The chat body: its own fields, and messages near valid ones (roles, content strings or text parts, extra keys).
MESSAGE = st.fixed_dictionaries(
    {"role": st.one_of(st.sampled_from(["system", "user", "assistant", "tool"]), TEXT),
     "content": st.one_of(TEXT, st.sampled_from(CHAT_TOKENS), st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url"]), "text": TEXT}), max_size=2), JSON)},
    optional={"name": TEXT})
VALID_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": st.text(max_size=30)}), min_size=1, max_size=3)
CHAT_NEAR = {**NEAR, "messages": st.one_of(VALID_MESSAGES, st.lists(st.one_of(MESSAGE, JSON), max_size=4)),
             "logprobs": st.booleans(), "top_logprobs": st.integers(-1, 21), "max_completion_tokens": st.integers(-1, 40),
             "max_tokens": st.integers(-1, 40), "n": st.integers(0, 5), "temperature": st.floats(0, 2.5)}
CHAT_FIELDS = ["messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop",
               "n", "seed", "logprobs", "top_logprobs", "stream", "stream_options", "user", "frequency_penalty",
               "presence_penalty", "logit_bias"]


@st.composite
def bodies(draw, fields_of=tuple(FIELDS), near=NEAR, required="prompt") -> bytes:
    fields = {}
    for name in draw(st.lists(st.sampled_from(list(fields_of) + ["junk"]), max_size=8, unique=True)):
        fields[name] = draw(st.one_of(JSON, near.get(name, NUMBERS)))
    if draw(st.booleans()):
        fields.setdefault(required, draw(near[required]))
    for name, value in draw(st.dictionaries(TEXT, JSON, max_size=2)).items():  # unknown field names
        fields.setdefault(name, value)
    text = json.dumps(fields, allow_nan=True, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # raw surrogates: bytes that are not UTF-8 at all


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n", "x = [1, 2, 3]\nprint(x)\n"] * 20,
                                vocab_size=300)
    tokenizer.add_special_tokens(list(CHAT_TOKENS))  # ids 300 and 301: the sampler's 300 logits never draw them
    return tokenizer


def _check(body: bytes, tokenizer) -> None:
    try:
        request = parse_request(body, LIMITS)
    except RequestError as error:
        assert 400 <= error.status_code < 500, error.message
        json.dumps(error.body(), allow_nan=False).encode("utf-8")  # the answer can be sent
        return
    _check_sampling(sampling_of(request), request.seed, request.prompts, tokenizer)


def _check_chat(body: bytes, tokenizer) -> None:
    try:
        request = parse_chat_request(body, LIMITS)
        prompt, ids, sampling = chat_prompt(request, CHATML_TEMPLATE, tokenizer, 64, LIMITS)
    except RequestError as error:
        assert 400 <= error.status_code < 500, error.message
        json.dumps(error.body(), allow_nan=False).encode("utf-8")  # the answer can be sent
        return
    assert ids and len(ids) + sampling.max_tokens <= 64 and CHAT_TOKENS[1] in sampling.stop
    assert sampling.logprobs is None if not request.logprobs else 0 <= sampling.logprobs <= 20
    _check_sampling(sampling, request.seed, [prompt], tokenizer)


def _check_sampling(sampling, seed: int | None, prompts: list[str], tokenizer) -> None:
    for text in prompts + list(sampling.stop):
        text.encode("utf-8")
    for prompt in prompts:
        tokenizer.encode(prompt)
    assert 1 <= sampling.max_tokens <= LIMITS.max_tokens_cap
    assert sampling.temperature == 0 or 0 < sampling.temperature <= MAX_TEMPERATURE
    assert MIN_TOP_P <= sampling.top_p <= 1 and math.isfinite(sampling.top_p)
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    token = _sample(torch.randn(300, generator=generator), sampling, generator)
    assert 0 <= token < 300


@settings(max_examples=1500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies())
def test_any_json_in_any_field_is_accepted_or_refused_with_a_4xx(body, tokenizer):
    _check(body, tokenizer)


@settings(max_examples=500, deadline=None, database=None)
@given(body=st.binary(max_size=300))
def test_any_bytes_are_accepted_or_refused_with_a_4xx(body, tokenizer):
    _check(body, tokenizer)


@settings(max_examples=300, deadline=None, database=None)
@given(top_p=st.floats(min_value=0, max_value=1), temperature=st.floats(min_value=0, max_value=MAX_TEMPERATURE),
       top_k=st.one_of(st.none(), st.integers(min_value=1, max_value=10**6)))
def test_every_accepted_sampling_setting_samples(top_p, temperature, top_k, tokenizer):
    body = {"prompt": "x = ", "top_p": top_p, "temperature": temperature, "top_k": top_k}
    _check(json.dumps(body).encode(), tokenizer)


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=bodies(CHAT_FIELDS, CHAT_NEAR, "messages"))
def test_any_json_in_any_chat_field_is_accepted_or_refused_with_a_4xx(body, tokenizer):
    _check_chat(body, tokenizer)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=CHAT_NEAR["messages"], fields=st.lists(st.sampled_from(CHAT_FIELDS[1:]), max_size=3, unique=True).flatmap(
    lambda names: st.fixed_dictionaries({name: CHAT_NEAR.get(name, NUMBERS) for name in names})))
def test_near_valid_chat_bodies_are_accepted_or_refused_with_a_4xx(messages, fields, tokenizer):
    _check_chat(json.dumps({"messages": messages, **fields}, allow_nan=True).encode("utf-8", "surrogatepass"),
                tokenizer)

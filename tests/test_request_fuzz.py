"""Property-based tests of the request parser: any JSON in any field is accepted or refused with a 4xx.

The generated values are arbitrary JSON (any type, huge integers, NaN and infinities, lone
surrogates, deep nesting) plus near-valid values for each field, so both the type checks and
the value checks behind them are reached. What the parser accepts must then work: the prompts
tokenize, the seed seeds a torch.Generator, and the sampler draws a token with the settings.
"""
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


@st.composite
def bodies(draw) -> bytes:
    fields = {}
    for name in draw(st.lists(st.sampled_from(FIELDS + ["junk"]), max_size=8, unique=True)):
        fields[name] = draw(st.one_of(JSON, NEAR.get(name, NUMBERS)))
    if draw(st.booleans()):
        fields.setdefault("prompt", draw(NEAR["prompt"]))
    for name, value in draw(st.dictionaries(TEXT, JSON, max_size=2)).items():  # unknown field names
        fields.setdefault(name, value)
    text = json.dumps(fields, allow_nan=True, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass")  # raw surrogates: bytes that are not UTF-8 at all


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["def add(a, b):\n    return a + b\n", "x = [1, 2, 3]\nprint(x)\n"] * 20, vocab_size=300)


def _check(body: bytes, tokenizer) -> None:
    try:
        request = parse_request(body, LIMITS)
    except RequestError as error:
        assert 400 <= error.status_code < 500, error.message
        json.dumps(error.body(), allow_nan=False).encode("utf-8")  # the answer can be sent
        return
    sampling = sampling_of(request)
    for text in request.prompts + list(sampling.stop):
        text.encode("utf-8")
    for prompt in request.prompts:
        tokenizer.encode(prompt)
    assert 1 <= sampling.max_tokens <= LIMITS.max_tokens_cap
    assert sampling.temperature == 0 or 0 < sampling.temperature <= MAX_TEMPERATURE
    assert MIN_TOP_P <= sampling.top_p <= 1 and math.isfinite(sampling.top_p)
    generator = torch.Generator().manual_seed(request.seed if request.seed is not None else 0)
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

"""Checks the endpoint makes before answering, without starting Ray: every field honoured or refused by name."""
import json
import random
import socket

import pytest

from components.completions import (
    CompletionRequest, RequestError, check_context, check_model, parse_request, sampling_of,
)
from components.config import ServeConfig
from components.sampling import MAX_SEED, MIN_TOP_P
from pipelines.serving import ServeError, _check_port_free, deployment_options

LIMITS = ServeConfig(max_body_bytes=4096, max_prompt_chars=100, max_tokens_cap=16, max_choices=4)


def _parse(**fields):
    return parse_request(json.dumps(fields).encode(), LIMITS)


def _refused(body, status=400) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(body if isinstance(body, bytes) else json.dumps(body).encode(), LIMITS)
    assert info.value.status_code == status, info.value.message
    return info.value


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=rf"127.0.0.1:{port}.*serve.port"):
            _check_port_free("127.0.0.1", port)


def test_every_problem_of_a_request_is_named_at_once():
    error = _refused({"prompt": "x" * 101, "max_tokens": 17, "temperature": 3.0, "n": 5, "seed": -1, "top_p": 0})
    for name in ["prompt:", "max_tokens:", "temperature:", "n:", "seed:", "top_p:"]:
        assert name in error.message
    assert error.param == "prompt" and error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("fields, name", [
    ({"temperature": 1e-39}, "temperature"),  # logits / 1e-39 overflows float32
    ({"temperature": 2.5}, "temperature"),
    ({"seed": MAX_SEED + 1}, "seed"),
    ({"seed": 2**64}, "seed"),  # torch.Generator.manual_seed raises on it
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 1e-46}, "top_p"),  # 0 in float32: the sampler's nucleus was empty and the whole batch failed
    ({"top_p": MIN_TOP_P / 2}, "top_p"),
    ({"top_p": 10**400}, "top_p"),  # a JSON integer too large for a float
    ({"temperature": -(10**400)}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"n": 0}, "n"),
    ({"logprobs": 6}, "logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"best_of": 3}, "best_of"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1}, "presence_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"suffix": "return x"}, "suffix"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": [1, 2, 3]}, "prompt"),  # token ids
    ({"prompt": []}, "prompt"),
    ({"prompt": ["ok", ""]}, "prompt"),
    ({"max_tokens": "5"}, "max_tokens"),  # strict types, as OpenAI
    ({"echo": 1}, "echo"),
    ({"stream": "yes"}, "stream"),
    ({"temperature": "hot"}, "temperature"),
    ({"functions": []}, "functions"),  # unknown fields are refused, not ignored
])
def test_each_field_is_refused_by_name(fields, name):
    error = _refused({"prompt": "def f():", **fields})
    assert error.param == name and name in error.message, error.message


def test_the_smallest_top_p_is_accepted():
    assert sampling_of(_parse(prompt="x", top_p=MIN_TOP_P)).top_p == MIN_TOP_P


@pytest.mark.parametrize("fields, name", [
    ({"prompt": "def \ud800"}, "prompt"),  # JSON's "\ud800" escape: a lone surrogate, which UTF-8 cannot carry
    ({"prompt": ["ok", "x\udfff"]}, "prompt"),
    ({"stop": "\ud800"}, "stop"),
    ({"stop": ["\n", "a\udc00b"]}, "stop"),
    ({"model": "tiny\ud800"}, "model"),
    ({"user": "\ud800"}, "user"),
    ({"suffix": "\ud800"}, "suffix"),
    ({"logit_bias": {"\ud800": 1}}, "logit_bias"),
    ({"stream": True, "stream_options": {"\ud800": True}}, "stream_options"),
    ({"\ud800": 1}, None),  # the field's own name
])
def test_a_string_that_is_not_utf8_is_refused_by_name(fields, name):
    error = _refused({"prompt": "def f():", **fields})
    assert error.param == name and "UTF-8" in error.message, error.message
    json.dumps(error.body(), allow_nan=False).encode("utf-8")  # the answer itself encodes


def test_bodies_that_are_not_requests_are_400_and_big_ones_413():
    assert _refused(b"{not json").param is None
    assert "JSON object" in _refused(b"[1, 2]").message
    assert _refused(b"\xff\xfe").status_code == 400
    assert _refused(b"[" * 100000 + b"]" * 100000, status=413).code == "request_too_large"
    assert _refused(b"[" * 4000).status_code == 400  # deep nesting under the size limit
    assert "prompt" in _refused({}).message


def test_the_fields_are_honoured_as_sampling_settings():
    r = _parse(prompt=["a", "b"], max_tokens=5, temperature=0, top_p=0.5, top_k=3, stop="\n", n=2, echo=True,
               logprobs=2, seed=7, stream=True, stream_options={"include_usage": True}, user="me", best_of=2)
    s = sampling_of(r)
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.stop, s.echo, s.logprobs) == (5, 0.0, 0.5, 3, ("\n",), True, 2)
    assert r.prompts == ["a", "b"] and r.choices_per_prompt == 2
    nulls = _parse(prompt="x", max_tokens=None, temperature=None, top_p=None, n=None, stop=None)  # OpenAI's nulls
    assert sampling_of(nulls).max_tokens == 16 and sampling_of(nulls).temperature == 1.0


def test_a_request_for_another_model_is_404():
    check_model(CompletionRequest(prompt="x"), "tiny:v3")
    check_model(CompletionRequest(prompt="x", model="tiny:v3"), "tiny:v3")
    check_model(CompletionRequest(prompt="x", model="tiny"), "tiny:v3")  # the registered model's champion
    for other in ["tiny:v2", "gpt-4", "tin"]:
        with pytest.raises(RequestError) as info:
            check_model(CompletionRequest(prompt="x", model=other), "tiny:v3")
        assert info.value.status_code == 404 and info.value.code == "model_not_found"


def test_a_prompt_that_does_not_fit_the_context_is_refused():
    check_context([10, 20], 12, 32, single=False)
    with pytest.raises(RequestError, match=r"prompt\[1\]: 25 tokens \+ max_tokens 12 .* 32") as info:
        check_context([10, 25], 12, 32, single=False)
    assert info.value.code == "context_length_exceeded"


def test_random_garbage_is_always_a_4xx():
    rng = random.Random(0)
    values = [None, True, 0, -1, 2**70, 1.5, float("nan"), "", "x" * 200, [], [1], ["a"], {}, {"a": 1}]
    fields = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed", "echo", "logprobs",
              "stream", "stream_options", "model", "best_of", "logit_bias", "suffix", "user", "junk"]
    for _ in range(300):
        body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 5))}
        text = json.dumps(body, allow_nan=True).encode()
        try:
            parse_request(text, LIMITS)
        except RequestError as error:
            assert 400 <= error.status_code < 500


def test_deployment_options_follow_the_yaml():
    fixed = deployment_options(ServeConfig(num_replicas=2, max_batch_size=32, max_ongoing_requests=8))
    assert fixed["num_replicas"] == 2 and fixed["max_ongoing_requests"] == 32  # never below the batch size
    scaled = deployment_options(ServeConfig(num_replicas=1, max_replicas=3, num_gpus=1))
    assert scaled["autoscaling_config"]["max_replicas"] == 3 and "num_replicas" not in scaled
    assert scaled["ray_actor_options"]["num_gpus"] == 1


def test_bad_serve_settings_name_their_keys():
    from components.experiment_file import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["serve.max_batch_size=0", "serve.batch_wait_timeout_s=-1", "serve.num_replicas=2",
                           "serve.max_replicas=1", "serve.max_queued_rows=0", "serve.poll_interval_s=-5"])
    for key in ["serve.max_batch_size", "serve.batch_wait_timeout_s", "serve.max_replicas", "serve.max_queued_rows",
                "serve.poll_interval_s"]:
        assert key in str(info.value)
    with pytest.raises(ConfigError, match="serve.max_choices"):
        load_config(None, ["serve.max_batch_size=4", "serve.max_choices=8"])

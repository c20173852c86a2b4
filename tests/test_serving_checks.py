"""Checks the Serve endpoint makes before and while answering, without starting Ray."""
import socket

import pytest

from components.sampling import MAX_SEED
from pipelines.serving import CompletionRequest, RequestError, ServeError, _check_model, _check_port_free, _validate

LIMITS = {"max_prompt_chars": 100, "max_tokens_cap": 16}


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=rf"127.0.0.1:{port}.*serve.port"):
            _check_port_free("127.0.0.1", port)


def test_every_problem_of_a_request_is_named_at_once():
    request = CompletionRequest(prompt="x" * 101, max_tokens=17, temperature=3.0, n=2, seed=-1)
    with pytest.raises(RequestError) as info:
        _validate(request, LIMITS)
    assert info.value.status_code == 400
    for field in ["prompt", "max_tokens", "temperature", "n:", "seed"]:
        assert field in info.value.message


@pytest.mark.parametrize("fields, name", [
    ({"temperature": 1e-39}, "temperature"),  # logits / 1e-39 overflows float32
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"seed": MAX_SEED + 1}, "seed"),
    ({"seed": 2**64}, "seed"),  # torch.Generator.manual_seed raises on it
    ({"seed": -(2**63) - 1}, "seed"),
])
def test_values_the_sampler_cannot_take_are_400(fields, name):
    with pytest.raises(RequestError) as info:
        _validate(CompletionRequest(prompt="x", **fields), LIMITS)
    assert info.value.status_code == 400 and info.value.message.startswith(f"{name}:")


def test_a_request_for_another_model_is_404():
    _check_model(CompletionRequest(prompt="x"), "tiny:v3")
    _check_model(CompletionRequest(prompt="x", model="tiny:v3"), "tiny:v3")
    _check_model(CompletionRequest(prompt="x", model="tiny"), "tiny:v3")  # the registered model's champion
    for other in ["tiny:v2", "gpt-4", "tin"]:
        with pytest.raises(RequestError) as info:
            _check_model(CompletionRequest(prompt="x", model=other), "tiny:v3")
        assert info.value.status_code == 404 and info.value.code == "model_not_found"


def test_a_good_request_passes():
    _validate(CompletionRequest(prompt="def f():", max_tokens=16, temperature=0.0), LIMITS)
    _validate(CompletionRequest(prompt="def f():", temperature=0.001, seed=MAX_SEED), LIMITS)

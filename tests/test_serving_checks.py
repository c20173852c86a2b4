"""Checks the Serve endpoint makes before and while answering, without starting Ray."""
import socket

import pytest
from fastapi import HTTPException

from pipelines.serving import CompletionRequest, ServeError, _check_port_free, _validate

LIMITS = {"max_prompt_chars": 100, "max_tokens_cap": 16}


def test_a_busy_port_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServeError, match=rf"127.0.0.1:{port}.*serve.port"):
            _check_port_free("127.0.0.1", port)


def test_every_problem_of_a_request_is_named_at_once():
    request = CompletionRequest(prompt="x" * 101, max_tokens=17, temperature=3.0, n=2)
    with pytest.raises(HTTPException) as info:
        _validate(request, LIMITS)
    assert info.value.status_code == 400
    for field in ["prompt", "max_tokens", "temperature", "n:"]:
        assert field in info.value.detail


def test_a_good_request_passes():
    _validate(CompletionRequest(prompt="def f():", max_tokens=16, temperature=0.0), LIMITS)

"""The Serve endpoint on a real local Ray: OpenAI-shaped errors, and no application left after a failed deploy."""
import functools
import json
import socket
import time
import urllib.error
import urllib.request

import pytest

from components.config import ServeConfig
from pipelines import ray_runtime, serving
from tests.conftest import free_port, make_candidate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    # A replica whose constructor fails is retried 3 times by default; once shows the same here.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
        ray_runtime.init_ray(2)
        try:
            yield
        finally:
            ray_runtime.shutdown_ray()


@pytest.fixture(scope="module")
def candidate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving") / "candidate"
    return folder, make_candidate(folder, "int8_dynamic")


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _serve_application_running() -> bool:
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return True
    except ValueError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_requests_are_answered_or_refused_in_openai_shape(ray_local, candidate):
    folder, pin = candidate
    url = serving.deploy(serving.FolderLoader(str(folder), "tiny:v7", pin), ServeConfig(port=free_port()))
    try:
        good = {"prompt": "def add(a, b):", "max_tokens": 6, "temperature": 0.8, "seed": 42}
        status, body = _post(f"{url}/v1/completions", {**good, "model": "tiny:v7"})
        assert status == 200 and body["model"] == "tiny:v7"
        assert _post(f"{url}/v1/completions", {**good, "model": "tiny"})[1]["choices"] == body["choices"]  # seeded

        status, body = _post(f"{url}/v1/completions", {**good, "model": "gpt-4"})
        assert status == 404
        assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
        assert "tiny:v7" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"

        for bad, name in [({"temperature": 1e-39}, "temperature"), ({"seed": 2**64}, "seed"),
                          ({"seed": -1}, "seed"), ({"max_tokens": 0}, "max_tokens")]:
            status, body = _post(f"{url}/v1/completions", {**good, **bad})
            assert status == 400, (bad, body)
            assert body["error"]["message"].startswith(f"{name}:")
        status, body = _post(f"{url}/v1/completions", {"max_tokens": 3})  # pydantic's check, same shape
        assert status == 422 and "prompt" in body["error"]["message"]
    finally:
        serving.shutdown()
        # The killed controller's name lingers briefly; a deploy right after could find it dying.
        deadline = time.monotonic() + 30
        while _serve_application_running() and time.monotonic() < deadline:
            time.sleep(0.5)


def test_a_deploy_whose_replica_fails_leaves_no_serve_application(ray_local, candidate, tmp_path):
    import shutil

    folder, pin = candidate
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    (tampered / "extra.bin").write_bytes(b"x")
    port = free_port()
    with pytest.raises(RuntimeError, match="Deploying application gptforge failed"):
        serving.deploy(serving.FolderLoader(str(tampered), "tiny:v7", pin), ServeConfig(port=port), timeout_s=300)
    assert not _serve_application_running() and _port_free(port)


def test_a_deploy_that_never_gets_healthy_times_out_and_leaves_nothing(ray_local):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not start within 10s"):
        serving.deploy(functools.partial(time.sleep, 600), ServeConfig(port=port), timeout_s=10)  # a hung loader
    assert time.monotonic() - started < 120
    assert not _serve_application_running() and _port_free(port)

"""Failed deploys on a real local Ray leave no Serve application behind (tests/test_serving_api.py: the API)."""
import functools
import socket
import time

import pytest

from components.config import ServeConfig
from pipelines import http_app, ray_runtime, serving
from pipelines.model_loading import FolderLoader
from tests.helpers import free_port, make_candidate

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


def test_a_deploy_whose_replica_fails_leaves_no_serve_application(ray_local, candidate, tmp_path):
    import shutil

    folder, pin = candidate
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    (tampered / "extra.bin").write_bytes(b"x")
    port = free_port()
    with pytest.raises(RuntimeError, match="Deploying application gptforge failed"):
        serving.deploy(FolderLoader(str(tampered), "tiny:v7", pin), ServeConfig(port=port), timeout_s=300)
    assert not _serve_application_running() and _port_free(port)


def test_a_deploy_that_never_gets_healthy_times_out_and_leaves_nothing(ray_local):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not start within 10s"):
        serving.deploy(functools.partial(time.sleep, 600), ServeConfig(port=port), timeout_s=10)  # a hung loader
    assert time.monotonic() - started < 120
    assert not _serve_application_running() and _port_free(port)


# Slow (two replicas to start on 2 cores); `./scripts/test -m slow tests/test_serving.py`.
@pytest.mark.slow
def test_two_replicas_behind_haproxy_share_the_requests(ray_local, candidate):
    import concurrent.futures
    import json
    import urllib.request

    folder, pin = candidate
    cfg = ServeConfig(port=free_port(), num_replicas=2, num_cpus=0.5, max_batch_size=4, poll_interval_s=0)
    url = serving.deploy(FolderLoader(str(folder), "tiny:v1", pin), cfg, timeout_s=300)
    try:
        def complete(i):
            request = urllib.request.Request(
                f"{url}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
                data=json.dumps({"prompt": f"x = {i}", "max_tokens": 8}).encode())
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.headers[http_app.REPLICA_HEADER], response.headers[http_app.VERSION_HEADER]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(complete, range(48)))
    finally:
        serving.shutdown()
    assert {status for status, _, _ in answers} == {200}
    assert {version for _, _, version in answers} == {"tiny:v1"}
    assert len({replica for _, replica, _ in answers}) == 2, answers  # both replicas answered

"""The cluster's MLflow server as ray_cluster.yaml starts it (its `--app-name`), for real on 127.0.0.1,
its admin being the account the pipeline's clients use (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD
from the environment). Without those credentials, with wrong ones, or as a read-only colleague, nobody can
move `champion`; with them, the project's own registry calls can. And a job never carries them."""
from __future__ import annotations

import re
import secrets

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.experiment_file import load_config
from pipelines import registry
from pipelines.registry import CHAMPION
from pipelines.tracking import Tracker
from tests.helpers import REPO, MlflowServer, promote_candidates

pytestmark = pytest.mark.integration

USER = "gptforge"
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _cluster_server_args() -> tuple[str, ...]:
    """The `--app-name` the cluster's head gives `mlflow server` (none: the plain, open server)."""
    head = " ".join(yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["head_start_ray_commands"])
    (command,) = re.findall(r"mlflow server.*", head)
    app = re.search(r"--app-name (\S+)", command)
    return ("--app-name", app.group(1)) if app else ()


@pytest.fixture
def server(tmp_path):
    password = secrets.token_hex(16)
    # As the head starts it: the admin is bootstrapped from the same credentials the clients use,
    # and a static secret key (CSRF) that every worker of the server shares. The auth database is
    # basic_auth.db in the folder the server starts in.
    process = MlflowServer(tmp_path, args=_cluster_server_args(), env={
        "MLFLOW_AUTH_ADMIN_USERNAME": USER, "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)})
    try:
        yield {"url": process.url, "password": password, "tmp": tmp_path}
    finally:
        process.stop()


def _as(monkeypatch, user: str | None, password: str | None = None) -> None:
    """Make the MLflow clients of this process use these credentials (None: none at all)."""
    for variable, value in zip(CREDENTIALS, (user, password)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)


def _refused(write) -> int:
    with pytest.raises(MlflowException) as refused:
        write()
    return refused.value.get_http_status_code()


def test_only_the_pipelines_credentials_move_the_champion(server, monkeypatch):
    url, name = server["url"], "guarded"
    _as(monkeypatch, USER, server["password"])
    cfg = load_config(None, [f"name={name}"])
    tracker = Tracker(url, name)
    _, v1 = promote_candidates(tracker, cfg, server["tmp"], {"fp32": 10.0})
    _, v2 = promote_candidates(tracker, cfg, server["tmp"], {"fp32": 9.0})
    assert registry.alias_version(url, name, CHAMPION).version == v2

    def refused_as(user: str | None, password: str | None) -> int:
        _as(monkeypatch, user, password)
        return _refused(lambda: MlflowClient(url).set_registered_model_alias(name, CHAMPION, v1))

    assert refused_as(None, None) == 401
    assert refused_as(USER, "not-the-password") == 401
    # The admin makes a colleague's account: it may read (the default permission), not write.
    from mlflow.server.auth.client import AuthServiceClient

    _as(monkeypatch, USER, server["password"])
    AuthServiceClient(url).create_user("colleague", "colleague-password")
    assert refused_as("colleague", "colleague-password") == 403

    _as(monkeypatch, USER, server["password"])
    assert registry.alias_version(url, name, CHAMPION).version == v2  # nothing moved it
    registry.move_champion(url, name, v1)  # a rollback, as `gptforge promote --rollback` makes it
    assert registry.alias_version(url, name, CHAMPION).version == v1
    assert registry.alias_version(url, name, registry.PREVIOUS).version == v2


def test_a_job_does_not_carry_the_credentials_in_its_runtime_env(monkeypatch):
    """The job's runtime_env is on the dashboard for anyone who reaches it: the job's MLflow
    credentials come from its node's environment instead (ray_cluster.yaml)."""
    from pipelines import jobs

    _as(monkeypatch, USER, "the-password")
    _, _, env = jobs.pipeline_job(None, [], "/tmp/w", "http://10.0.0.5:8265", "http://10.0.0.5:5000")
    assert env == {"MLFLOW_TRACKING_URI": "http://10.0.0.5:5000"}

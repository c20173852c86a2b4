"""MLFLOW_TRACKING_URI pointing at a real `mlflow server`: runs, artifacts and the registry go through HTTP.

Also what happens when that server does not answer: promotion fails and moves
nothing, `gptforge serve` says which server, and no credential is printed.
"""
import os

import pytest
from mlflow import MlflowClient

from components.experiment_file import load_config
from pipelines.registry import CHAMPION, download_version, find_alias
from pipelines.tracking import Tracker, TrackingError, redact
from tests.helpers import FAST_OVERRIDES, TINY_EXPERIMENT, free_port, gptforge, promote_candidates

pytestmark = pytest.mark.integration

SECRET = "s3cret-Pw"
# MLflow retries a refused connection 7 times with exponential backoff (minutes); one try is enough here.
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def _with_credentials(url: str) -> str:
    return url.replace("http://", f"http://gptforge:{SECRET}@")


# Slow (a whole pipeline against a server). In one full-suite run on a loaded machine the pytest
# process ended with status 1 and no summary while this test ran; alone it passes (3 min).
# Run it with `./scripts/test -m slow tests/test_tracking_server.py`.
@pytest.mark.slow
def test_pipeline_against_an_mlflow_server(tmp_path, mlflow_server):
    overrides = [*FAST_OVERRIDES, "pretrain.max_steps=5", "finetune.max_steps=3", "quantize.variants=[int8_dynamic]",
                 f"workdir={tmp_path / 'work'}"]
    # The server has no auth, so it ignores the credentials; the point is that none is printed.
    result = gptforge("run", str(TINY_EXPERIMENT), *overrides, cwd=tmp_path,
                      env={"MLFLOW_TRACKING_URI": _with_credentials(mlflow_server)})
    assert result.returncode == 0, result.stderr[-5000:]
    assert SECRET not in result.stdout + result.stderr
    link = f"{mlflow_server.replace('http://', 'http://gptforge:***@')}/#/experiments/"
    assert link in result.stdout  # the parent run's UI link, redacted
    assert "View run" not in result.stdout  # not one link per run
    assert not (tmp_path / "work" / "mlflow.db").exists()  # nothing went to the local default store

    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("tiny", "champion")
    served = find_alias(mlflow_server, "tiny")
    assert served.version == version.version
    folder = download_version(mlflow_server, served, str(tmp_path / "download"))
    assert sorted(os.listdir(folder)) == ["checksums.json", "config.json", "model.safetensors", "tokenizer.json"]


def test_server_stopped_before_promotion_moves_nothing(tmp_path, mlflow_server_process, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = mlflow_server_process
    cfg = load_config(None, ["name=guarded"])
    tracker = Tracker(_with_credentials(server.url), cfg.name)
    first, v1 = promote_candidates(tracker, cfg, tmp_path, {"fp32": 10.0})
    assert first.promote

    # A better candidate, but the server goes away just before the promote stage.
    with pytest.raises(TrackingError) as info:
        promote_candidates(tracker, cfg, tmp_path, {"fp32": 5.0}, before_promote=server.stop)
    message = str(info.value)
    assert f"gptforge:***@127.0.0.1:{server.port}" in message and "nothing was changed" in message
    assert SECRET not in message

    store = MlflowClient(f"sqlite:///{server.db}")  # the server's own database, read directly
    assert str(store.get_model_version_by_alias(cfg.name, CHAMPION).version) == str(v1)
    assert [str(v.version) for v in store.search_model_versions(f"name='{cfg.name}'")] == [str(v1)]


def test_no_server_is_not_the_same_as_no_champion(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    port = free_port()
    with pytest.raises(TrackingError, match=rf"gptforge:\*\*\*@127.0.0.1:{port} failed while looking up tiny@champion"):
        find_alias(f"http://gptforge:{SECRET}@127.0.0.1:{port}", "tiny")
    # A store that answers "no such model" or "no such alias" is the only "no champion yet".
    sqlite = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(LookupError, match="no model version with alias 'champion'"):
        find_alias(sqlite, "tiny")
    MlflowClient(sqlite, sqlite).create_registered_model("tiny")
    with pytest.raises(LookupError, match="no model version with alias 'champion'"):
        find_alias(sqlite, "tiny")


@pytest.mark.parametrize("uri", [f"http://gptforge:{SECRET}@127.0.0.1:{{port}}",
                                 f"postgresql://gptforge:{SECRET}@127.0.0.1:{{port}}/mlflow"])
@pytest.mark.parametrize("command", ["serve", "runs"])
def test_cli_names_the_unreachable_server_without_its_password(tmp_path, uri, command):
    uri = uri.format(port=free_port())
    result = gptforge(command, str(TINY_EXPERIMENT), f"workdir={tmp_path / 'work'}", cwd=tmp_path, timeout=300,
                      env={"MLFLOW_TRACKING_URI": uri, **NO_RETRIES})
    assert result.returncode == 2, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert f"{redact(uri)} failed while" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("uri, shown", [
    ("http://user:password@host:5000", "http://user:***@host:5000"),
    ("https://user:p%40ss@mlflow.example.com/path", "https://user:***@mlflow.example.com/path"),
    ("postgresql://user:password@db.internal:5432/mlflow", "postgresql://user:***@db.internal:5432/mlflow"),
    ("postgresql+psycopg2://user:password@db/mlflow?sslmode=require", "postgresql+psycopg2://user:***@db/mlflow?sslmode=require"),
    ("https://ghp_tokenvalue@github.com/org/repo", "https://***@github.com/org/repo"),
    ("https://host/api?token=abc123&x=1", "https://host/api?token=***&x=1"),
    ("s3://bucket/key?X-Amz-Signature=deadbeef", "s3://bucket/key?X-Amz-Signature=***"),
    ("sqlite:////home/me/.gptforge/mlflow.db", "sqlite:////home/me/.gptforge/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("https://admin:pa/ss@host:8265", "https://admin:***@host:8265"),  # a "/" in the password
    ("https://admin:p@ss@host/x", "https://admin:***@host/x"),  # an "@" in the password
    ("admin:TOKEN@10.0.0.5:6379", "admin:***@10.0.0.5:6379"),  # no scheme (a Ray GCS address)
    ("ray://admin:TOKEN@head:10001", "ray://admin:***@head:10001"),
    ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
    ("https://host/api?pass=abc&x=1", "https://host/api?pass=***&x=1"),
    ("https://host/cb#token=abc", "https://host/cb#token=***"),
    ("https://host/cb#access_token=abc&state=1", "https://host/cb#access_token=***&state=1"),
    ("https://h/x?password=a&pwd=b&secret=c&key=d&api_key=e&signature=f&n=1",
     "https://h/x?password=***&pwd=***&secret=***&key=***&api_key=***&signature=***&n=1"),
    ("https://h/x?X-Amz-Credential=AKIA%2F2026&X-Amz-Security-Token=t&X-Amz-Signature=abc",
     "https://h/x?X-Amz-Credential=***&X-Amz-Security-Token=***&X-Amz-Signature=***"),
    ("https://registry.npmjs.org/@scope/pkg", "https://registry.npmjs.org/@scope/pkg"),
    ("ValueError: x@y", "ValueError: x@y"),
    ("models:/tiny@champion", "models:/tiny@champion"),  # a registry URI, no secret in it
])
def test_redact_hides_passwords_and_tokens(uri, shown):
    assert redact(uri) == shown
    assert redact(f"API request to {uri} failed: {uri}") == f"API request to {shown} failed: {shown}"

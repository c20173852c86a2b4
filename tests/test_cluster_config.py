"""ray_cluster.yaml against the Ray cluster launcher's own schema, and its security defaults; no machine starts."""
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helpers import REPO

CLUSTER = REPO / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_matches_the_launchers_schema(cluster):
    jsonschema.validate(cluster, _ray_schema())
    # And Ray's own check, as `ray up` runs it before talking to any cloud.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))


def test_the_schema_check_catches_a_wrong_field(cluster):
    broken = {**cluster, "max_workers": "many"}
    with pytest.raises(jsonschema.ValidationError, match="many"):
        jsonschema.validate(broken, _ray_schema())


def test_head_runs_mlflow_with_a_database_and_an_object_store(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    assert "mlflow server" in head
    assert re.search(r"--backend-store-uri (sqlite|postgresql|mysql)", head)
    assert re.search(r"--artifacts-destination s3://", head)
    types = cluster["available_node_types"]
    head_type = types[cluster["head_node_type"]]
    assert "g5" not in head_type["node_config"]["InstanceType"]  # a CPU head
    gpu_types = [name for name, t in types.items() if t["node_config"]["InstanceType"].startswith(("g5", "p4", "p5"))]
    assert len(gpu_types) >= 2
    assert all(types[t]["min_workers"] == 0 < types[t]["max_workers"] for t in gpu_types)  # scale from zero


def test_setup_installs_the_project(cluster):
    assert any("scripts/bootstrap" in c for c in cluster["setup_commands"])
    assert cluster["file_mounts"]["/home/ubuntu/gptforge"] == "."


def test_secure_defaults(cluster):
    provider = cluster["provider"]
    assert provider["use_internal_ips"] is True
    for rule in provider["security_group"]["IpPermissions"]:
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", []))
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    assert "--host 0.0.0.0" not in head
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        (start,) = [c for c in commands if "ray start" in c]
        settings = _start_settings(start)
        assert settings["RAY_AUTH_MODE"] == "token"
        assert settings["RAY_worker_niceness"] == "0"  # training at the daemons' priority, as locally
        # The same Serve ingress as a local run (pipelines/ray_runtime.py), with a drain that fits
        # in Serve's 30 s shutdown wait together with its 5 s margin.
        assert settings["RAY_SERVE_ENABLE_HA_PROXY"] == settings["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert float(settings["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) + 5 < 30
        # HAProxy's admin socket (level admin) in a folder only the node's user may enter.
        socket_folder = str(Path(settings["RAY_SERVE_HAPROXY_SOCKET_PATH"]).parent).replace("/home/ubuntu", "~")
        assert any(f"mkdir -p -m 700 {socket_folder}" in c for c in cluster["setup_commands"])
    assert "/home/ubuntu/.ray/auth_token" in cluster["file_mounts"]


def _start_settings(start: str) -> dict:
    """The VAR=value settings `ray start` runs with (after the env file is read, if it is)."""
    return dict(word.split("=", 1) for word in start.split("ray start")[0].split("&&")[-1].split())


ENV_FILE = "~/.config/gptforge/mlflow.env"


def test_mlflow_requires_a_login_whose_secret_is_not_in_the_file(cluster):
    head = " ".join(cluster["head_start_ray_commands"])
    (server,) = re.findall(r"mlflow server.*", head)
    assert "--app-name basic-auth" in server
    # Every node's Ray (so every job, training worker and Serve replica) and the server read the
    # account from the env file that file_mounts copies from the operator's machine.
    assert cluster["file_mounts"][ENV_FILE.replace("~", "/home/ubuntu")] == ENV_FILE
    assert any(f"chmod 600 {ENV_FILE}" in c for c in cluster["setup_commands"])
    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        (start,) = [c for c in commands if "ray start" in c]
        assert start.startswith(f"set -a && . {ENV_FILE} && set +a &&")
    assert re.search(rf"\. {re.escape(ENV_FILE)} \|\| exit 1;.*mlflow server", head)
    assert 'MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD"' in head
    # No value of a credential in the file itself, only references to the variables.
    text = CLUSTER.read_text()
    for variable in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        for value in re.findall(rf"{variable}=(\S+)", text):
            assert value.startswith(('"$', "...")), (variable, value)

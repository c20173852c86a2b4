"""The pipeline on a real two-node Ray cluster whose worker node cannot see the head's disk.

One machine holds it all: an S3 server (moto, on 127.0.0.1) with a bucket, an `mlflow
server`, a Ray head with 1 CPU and no worker resource, and a second Ray node started in a
private mount namespace where every test folder (the head's workdir included) is hidden
behind an empty tmpfs. That node has the custom resource `GPTFORGE_WORKER_RESOURCE` names,
so training workers and candidate tasks run there and can reach data only through `storage`.

The first test runs the tiny pipeline end to end; the slow ones (`./scripts/test -m "cluster
and slow"`) re-run it from the stage cache, kill a training worker mid-run, and serve.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from mlflow import MlflowClient

from pipelines.tracking import CACHED_FROM_TAG, STAGE_TAG
from tests.cluster_processes import RayNode, S3Server, stop_session, unshare_problem
from tests.helpers import run_id_of, stage_runs, JOB_OVERRIDES, TINY_EXPERIMENT, MlflowServer, cli_command, gptforge

pytestmark = [pytest.mark.cluster, pytest.mark.integration]

WORKER_RESOURCE = "gptforge_worker"
STORAGE = "s3://gptforge/tiny"
MLFLOW_ARTIFACTS = "s3://gptforge/mlflow-artifacts"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = unshare_problem()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("cluster")
    hidden = tmp_path_factory.getbasetemp()  # every folder of this test run, the head's workdir included
    started = []
    try:
        s3 = S3Server(root)
        started.append(s3)
        # The MLflow store: its database on the head's disk, its artifacts in the bucket, as in
        # ray_cluster.yaml; both reached over HTTP.
        mlflow = MlflowServer(root, env=s3.env, artifacts=MLFLOW_ARTIFACTS)
        started.append(mlflow)
        node_env = {**s3.env, "GPTFORGE_WORKER_RESOURCE": WORKER_RESOURCE}  # as ray_cluster.yaml sets them
        head = RayNode(1, env=node_env)
        started.append(head)
        head.wait_until_in_cluster(1)
        worker = RayNode(3, head.gcs_address, {WORKER_RESOURCE: 100}, hide=(hidden,), env=node_env)
        started.append(worker)
        worker.wait_until_in_cluster(2)
        env = {**node_env, "MLFLOW_TRACKING_URI": mlflow.url, "RAY_AUTH_MODE": "token",
               "GPTFORGE_CACHE": str(root / "cache")}
        yield {"root": root, "workdir": root / "work", "s3": s3, "mlflow": mlflow, "head": head, "worker": worker,
               "env": env, "worker_node": _node_id(head)}
    finally:
        for process in reversed(started):
            process.stop()


def _node_id(node: RayNode) -> str:
    """The Ray node id of the node holding the worker resource, asked of the cluster itself."""
    import subprocess
    import sys

    script = ("import ray; ray.init(address='%s', log_to_driver=False); "
              "print(*[n['NodeID'] for n in ray.nodes() if n['Alive'] and '%s' in n['Resources']])"
              % (node.gcs_address, WORKER_RESOURCE))
    found = subprocess.run([sys.executable, "-c", script], env=node.env, capture_output=True, text=True, timeout=120)
    (node_id,) = found.stdout.split()
    return node_id


@pytest.fixture(scope="module")
def first_run(cluster):
    """The tiny pipeline with `storage: s3://...`, submitted with `gptforge submit --follow`."""
    result = gptforge("submit", str(TINY_EXPERIMENT), *JOB_OVERRIDES, f"storage={STORAGE}",
                      f"workdir={cluster['workdir']}", "--address", cluster["head"].dashboard_url, "--follow",
                      cwd=cluster["root"], env=cluster["env"], timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return result


def test_the_pipeline_runs_on_two_nodes_with_its_outputs_in_the_bucket(cluster, first_run):
    run_id = run_id_of(first_run.stdout)
    client = MlflowClient(cluster["mlflow"].url)
    assert client.get_run(run_id).info.status == "FINISHED"
    runs = stage_runs(cluster["mlflow"].url, run_id)
    # The training workers and the candidate's tasks ran on the node that cannot see the head's disk.
    for stage in ("pretrain", "finetune"):
        assert set(runs[stage].data.tags["train.worker_nodes"].split(",")) == {cluster["worker_node"]}, stage
    candidate = runs["candidate"].data.tags
    assert candidate["candidate.quantize_node"] == candidate["candidate.evaluate_node"] == cluster["worker_node"]
    # Every stage's output is in the bucket, below runs/<pipeline run>/<stage>/ ...
    keys = cluster["s3"].keys(f"tiny/runs/{run_id}/")
    stages = {key.split("/")[3] for key in keys}
    assert {"prepare_data", "pretrain", "finetune", "candidates", "comparison"} <= stages, stages
    assert any(k.endswith("prepare_data/manifest.json") for k in keys)
    assert any(k.endswith("candidates/fp32/checksums.json") for k in keys)
    assert any(k.endswith("checkpoint.json") and "/finetune/" in k for k in keys)
    # ... and none on the head's disk, where only the MLflow database lives: the server keeps the
    # runs' artifacts and the registered model in the bucket too.
    workdir = cluster["workdir"]
    assert not (workdir / "runs").exists() and not (workdir / "ray_results").exists()
    assert not (cluster["root"] / "server-artifacts").exists()
    champion = client.get_model_version_by_alias("tiny", "champion")
    artifact_keys = cluster["s3"].keys("mlflow-artifacts/")
    assert any(k.endswith("checksums.json") for k in artifact_keys), artifact_keys[:20]
    assert champion.source and any(k.endswith("model.safetensors") for k in artifact_keys)


def test_a_local_storage_on_that_cluster_fails_before_any_run(cluster):
    client = MlflowClient(cluster["mlflow"].url)
    experiment = client.get_experiment_by_name("tiny")
    before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    local = cluster["root"] / "local-storage"
    result = gptforge("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, f"storage={local}",
                      f"workdir={cluster['workdir']}", cwd=cluster["root"],
                      env={**cluster["env"], "RAY_ADDRESS": cluster["head"].gcs_address}, timeout=300)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"storage={local}" in result.stderr and "cannot see" in result.stderr
    assert "s3://" in result.stderr  # says what to set
    assert "Traceback" not in result.stderr
    experiment = client.get_experiment_by_name("tiny")
    assert len(client.search_runs([experiment.experiment_id])) == before  # no run opened, none left RUNNING


def test_a_missing_bucket_fails_naming_it(cluster):
    result = gptforge("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, "storage=s3://no-such-bucket/tiny",
                      f"workdir={cluster['workdir']}", cwd=cluster["root"],
                      env={**cluster["env"], "RAY_ADDRESS": cluster["head"].gcs_address}, timeout=300)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "storage=s3://no-such-bucket/tiny" in result.stderr and "no-such-bucket" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_an_unchanged_rerun_through_ray_address_is_served_from_the_cache_in_the_bucket(cluster, first_run):
    result = gptforge("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, f"storage={STORAGE}",
                      f"workdir={cluster['workdir']}", cwd=cluster["root"],
                      env={**cluster["env"], "RAY_ADDRESS": cluster["head"].gcs_address}, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert result.stdout.count("    cached: reusing the output of run") == 3
    again = stage_runs(cluster["mlflow"].url, run_id_of(result.stdout))
    first = stage_runs(cluster["mlflow"].url, run_id_of(first_run.stdout))
    for stage in ("prepare_data", "pretrain", "finetune"):
        assert again[stage].data.tags[CACHED_FROM_TAG] == first[stage].info.run_id
    assert not (cluster["workdir"] / "runs").exists()


@pytest.mark.slow
def test_a_training_worker_killed_on_the_second_node_continues_from_its_checkpoint_in_the_bucket(cluster):
    import subprocess

    overrides = [*JOB_OVERRIDES, "pretrain.max_steps=40", "pretrain.checkpoint_every=10", "pretrain.max_failures=2",
                 "pretrain.cache=false", f"storage={STORAGE}-killed", f"workdir={cluster['workdir']}"]
    driver = subprocess.Popen(cli_command("run", str(TINY_EXPERIMENT), *overrides), cwd=cluster["root"],
                              env={**os.environ, **cluster["env"], "RAY_ADDRESS": cluster["head"].gcs_address},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = MlflowClient(cluster["mlflow"].url)
        pid = _pid_after_checkpoint(client, cluster["s3"], deadline=time.monotonic() + 900)
        os.kill(pid, signal.SIGKILL)
        output, _ = driver.communicate(timeout=1200)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, output[-6000:]
    runs = stage_runs(cluster["mlflow"].url, run_id_of(output))
    pretrain = runs["pretrain"]
    assert pretrain.info.status == "FINISHED"
    resumed = client.get_metric_history(pretrain.info.run_id, "train/resumed_from_step")
    assert resumed and resumed[-1].value >= 10, "continued from a checkpoint in the bucket, not from step 0"


def _pid_after_checkpoint(client: MlflowClient, s3: S3Server, deadline: float) -> int:
    """A training worker's pid, once the pretrain run's first checkpoint is in the bucket."""
    while time.monotonic() < deadline:
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{STAGE_TAG}` = 'pretrain' "
                                  "and attributes.status = 'RUNNING'") if experiment else []
        checkpoints = [k for k in s3.keys("tiny-killed/") if k.endswith("/checkpoint.json")]
        if runs and checkpoints and "train.worker_pids" in runs[0].data.tags:
            return int(runs[0].data.tags["train.worker_pids"].split(",")[-1])
        time.sleep(1)
    raise TimeoutError("pretraining wrote no checkpoint to the bucket in time")


@pytest.mark.slow
def test_serve_answers_with_its_replica_on_the_second_node(cluster, first_run):
    import json
    import subprocess
    import sys
    import urllib.request

    from tests.helpers import free_port

    port = free_port()
    env = {**os.environ, **cluster["env"], "RAY_ADDRESS": cluster["head"].gcs_address}
    server = subprocess.Popen(cli_command("serve", str(TINY_EXPERIMENT), f"workdir={cluster['workdir']}",
                                          f"serve.port={port}"), cwd=cluster["root"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()[-4000:]
            time.sleep(2)
        request = urllib.request.Request(f"{url}/v1/completions", method="POST",
                                         headers={"Content-Type": "application/json"},
                                         data=json.dumps({"prompt": "def ", "max_tokens": 4}).encode())
        with urllib.request.urlopen(request, timeout=120) as reply:
            assert reply.status == 200 and json.loads(reply.read())["choices"][0]["text"] is not None
        script = ("import ray; from ray.util.state import list_actors; ray.init(address='%s', log_to_driver=False); "
                  "print(*{a.node_id for a in list_actors(filters=[('state', '=', 'ALIVE')]) "
                  "if 'Replica' in a.class_name})" % cluster["head"].gcs_address)
        nodes = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
        assert nodes.stdout.split() == [cluster["worker_node"]], nodes.stdout + nodes.stderr
    finally:
        stop_session(server, timeout_s=120)  # gptforge serve shuts Serve down on SIGTERM

"""`gptforge run --resume` after the driver was killed mid-pretraining: real CLI, Ray, MLflow."""
import os
import signal
import subprocess
import time

import pytest
from mlflow import MlflowClient

from pipelines.tracking import STAGE_TAG
from tests.helpers import FAST_OVERRIDES, TINY_EXPERIMENT, cli_command, cli_env, gptforge

pytestmark = pytest.mark.integration


def _stage_runs(client, experiment="tiny"):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], max_results=100)


def _pretrain_step(client) -> int:
    for run in _stage_runs(client):
        if run.data.tags.get(STAGE_TAG) == "pretrain":
            return int(run.data.metrics.get("train/step", 0))
    return 0


# Slow (minutes on 2 cores): kept out of the default suite so CI stays near 15 minutes.
@pytest.mark.slow
def test_resume_after_the_driver_is_killed_mid_pretrain(tmp_path):
    overrides = [*FAST_OVERRIDES, f"workdir={tmp_path}", "pretrain.max_steps=40", "pretrain.checkpoint_every=10",
                 "pretrain.log_every=1"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen(cli_command("run", str(TINY_EXPERIMENT), *overrides), cwd=tmp_path, env=cli_env(),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while _pretrain_step(client) < 23:
            assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "pretraining never reached step 23"
            time.sleep(0.5)
        killed_at = _pretrain_step(client)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started, with no chance to clean up
        driver.wait()
        log.close()

    runs = {r.data.tags[STAGE_TAG]: r for r in _stage_runs(client)}
    assert runs["pretrain"].info.status == "RUNNING"  # left as the killed driver had it
    parent_id = runs["pipeline"].info.run_id

    result = gptforge("run", str(TINY_EXPERIMENT), f"workdir={tmp_path}", "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(resumed)" in result.stdout
    assert "reused: finished in the interrupted run" in result.stdout  # prepare_data
    assert f"MLflow run: {parent_id}" in result.stdout

    all_runs = _stage_runs(client)
    by_stage = {}
    for run in all_runs:
        by_stage.setdefault(run.data.tags[STAGE_TAG], []).append(run)
    assert len(by_stage["prepare_data"]) == 1  # not redone
    assert len(by_stage["pretrain"]) == 1  # continued in the same run
    assert len(by_stage["pipeline"]) == 1
    assert all(r.info.status == "FINISHED" for r in all_runs)
    pretrain = by_stage["pretrain"][0]
    resumed = client.get_metric_history(pretrain.info.run_id, "train/resumed_from_step")
    assert len(resumed) == 1
    assert resumed[0].value in (20, 10) and killed_at - resumed[0].value <= 13  # the last checkpoint(s) before the kill
    assert max(m.step for m in client.get_metric_history(pretrain.info.run_id, "train/loss")) == 40
    assert client.get_model_version_by_alias("tiny", "champion") is not None


def test_resume_refuses_overrides_and_finished_runs(tmp_path):
    result = gptforge("run", str(TINY_EXPERIMENT), f"workdir={tmp_path}", "pretrain.max_steps=5", "--resume",
                      cwd=tmp_path)
    assert result.returncode == 2
    assert "pretrain.max_steps=5" in result.stderr and "Traceback" not in result.stderr
    result = gptforge("run", str(TINY_EXPERIMENT), f"workdir={tmp_path}", "--resume", cwd=tmp_path)
    assert result.returncode == 2
    assert "no interrupted run" in result.stderr and "Traceback" not in result.stderr

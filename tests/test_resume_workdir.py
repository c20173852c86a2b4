"""`gptforge run --resume` goes on writing where the interrupted run started, not into the current folder.

The interrupted run is made the way a killed driver leaves one (a pipeline run still RUNNING, its
resolved experiment logged), in a real MLflow store; no Ray is started.
"""
import pytest
import torch

from components.experiment_file import load_config, to_yaml
from pipelines import cli
from pipelines.tracking import Tracker
from tests.helpers import FAST_OVERRIDES, TINY_EXPERIMENT, gptforge


def _interrupted_run(tmp_path, *overrides: str) -> dict:
    """A pipeline run left RUNNING in a SQLite store outside its workdir, as MLFLOW_TRACKING_URI names it."""
    store, workdir, elsewhere = tmp_path / "store", tmp_path / "run #1", tmp_path / "elsewhere"
    store.mkdir()
    elsewhere.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    cfg = load_config(TINY_EXPERIMENT, [f"workdir={workdir}", *overrides])
    parent = Tracker(uri, cfg.name, artifact_location=str(store / "mlartifacts")).open_run(
        f"{cfg.name}-pipeline", stage="pipeline")
    parent.log_text(to_yaml(cfg), "experiment.yaml")
    return {"uri": uri, "run_id": parent.run_id, "workdir": workdir, "elsewhere": elsewhere, "cfg": cfg}


def _resumed(monkeypatch, run: dict, *argv: str):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", run["uri"])
    monkeypatch.chdir(run["elsewhere"])
    return cli._interrupted_run(cli._parser().parse_args(["run", *argv, "--resume"]))


def test_resume_continues_in_the_workdir_and_storage_the_run_recorded(tmp_path, monkeypatch, capsys):
    run = _interrupted_run(tmp_path, f"storage={tmp_path / 'shared'}")
    cfg, resume = _resumed(monkeypatch, run)
    assert resume.run_id == run["run_id"]
    assert cfg.workdir == str(run["workdir"])  # not ./.gptforge of the folder the command runs in
    assert cfg.storage == str(tmp_path / "shared")
    assert cfg.pretrain == run["cfg"].pretrain
    assert f"resuming run {run['run_id']} in workdir {run['workdir']}, storage {tmp_path / 'shared'}" \
        in capsys.readouterr().out
    assert not (run["elsewhere"] / ".gptforge").exists()


def test_an_explicit_workdir_moves_the_resumed_run(tmp_path, monkeypatch, capsys):
    run = _interrupted_run(tmp_path)
    cfg, _ = _resumed(monkeypatch, run, f"workdir={tmp_path / 'moved #2'}")
    assert cfg.workdir == str(tmp_path / "moved #2") and cfg.storage == ""
    assert f"in workdir {tmp_path / 'moved #2'} (given by workdir=)" in capsys.readouterr().out


def test_a_relative_workdir_is_recorded_absolute(tmp_path, monkeypatch):
    """The run records its workdir as the folder it was, so a resume from another folder finds it."""
    monkeypatch.chdir(tmp_path)
    args = cli._parser().parse_args(["run", str(TINY_EXPERIMENT), "workdir=relative/work"])
    cfg = cli.load_experiment(args)
    assert cfg.workdir == str(tmp_path / "relative" / "work")
    assert load_config(None, [f"workdir={cfg.workdir}"]).workdir == cfg.workdir


@pytest.mark.skipif(torch.cuda.is_available(), reason="the run stops at the missing GPU, before Ray starts")
def test_the_cli_says_where_the_resumed_run_writes(tmp_path):
    run = _interrupted_run(tmp_path, "pretrain.use_gpu=true")
    result = gptforge("run", "--resume", cwd=run["elsewhere"], env={"MLFLOW_TRACKING_URI": run["uri"]}, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"resuming run {run['run_id']} in workdir {run['workdir']} (the one it started with)" in result.stdout
    assert "pretrain.use_gpu: true, but this machine has no CUDA GPU" in result.stderr
    assert not (run["elsewhere"] / ".gptforge").exists()


# Slow (the whole pipeline, minutes on 2 cores): kept out of the default suite.
@pytest.mark.slow
@pytest.mark.integration
def test_a_resumed_pipeline_writes_its_stages_into_the_recorded_workdir(tmp_path):
    run = _interrupted_run(tmp_path, *FAST_OVERRIDES, "pretrain.max_steps=10", "finetune.max_steps=4",
                           "quantize.variants=[fp32]")
    result = gptforge("run", "--resume", cwd=run["elsewhere"], env={"MLFLOW_TRACKING_URI": run["uri"]})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"MLflow run: {run['run_id']}" in result.stdout
    assert any(run["workdir"].rglob("model.safetensors"))  # the stages' outputs: checkpoints and candidates
    assert list(run["elsewhere"].iterdir()) == []  # nothing written where the command ran

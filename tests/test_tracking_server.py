"""MLFLOW_TRACKING_URI pointing at a real `mlflow server`: runs, artifacts and the registry go through HTTP."""
import os

import pytest
from mlflow import MlflowClient

from pipelines.tracking import download_version, find_alias
from tests.conftest import FAST_OVERRIDES, TINY_EXPERIMENT, gptforge

pytestmark = pytest.mark.integration


def test_pipeline_against_an_mlflow_server(tmp_path, mlflow_server):
    overrides = [*FAST_OVERRIDES, "pretrain.max_steps=5", "finetune.max_steps=3", "quantize.variants=[int8_dynamic]",
                 f"workdir={tmp_path / 'work'}"]
    result = gptforge("run", str(TINY_EXPERIMENT), *overrides, cwd=tmp_path,
                      env={"MLFLOW_TRACKING_URI": mlflow_server})
    assert result.returncode == 0, result.stderr[-5000:]
    assert f"{mlflow_server}/#/experiments/" in result.stdout  # the parent run's UI link
    assert "View run" not in result.stdout  # not one link per run
    assert not (tmp_path / "work" / "mlflow.db").exists()  # nothing went to the local default store

    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("tiny", "champion")
    served = find_alias(mlflow_server, "tiny")
    assert served.version == version.version
    folder = download_version(mlflow_server, served, str(tmp_path / "download"))
    names = set(os.listdir(folder))
    assert {"model.safetensors", "config.json", "tokenizer.json", "checksums.json"} <= names

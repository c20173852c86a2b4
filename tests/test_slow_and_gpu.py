"""The default experiment exactly as a user runs it, and the GPU path.

Deselected by default (see pyproject.toml). Run with:
    ./scripts/test -m slow        # the full tiny experiment, 4-6 minutes on 2 cores
    ./scripts/test -m gpu         # on a machine with a CUDA GPU
"""
import pytest
from mlflow import MlflowClient

from tests.conftest import FAST_OVERRIDES, TINY_EXPERIMENT, gptforge


@pytest.mark.slow
@pytest.mark.integration
def test_default_tiny_experiment_end_to_end(tmp_path):
    result = gptforge("run", str(TINY_EXPERIMENT), f"workdir={tmp_path}", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "step   200/200" in result.stdout and "step   100/100" in result.stdout
    assert "<- champion" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_model_version_by_alias("tiny", "champion") is not None


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_trains_on_one_gpu(tmp_path):
    variants = "quantize.variants=[fp32,bf16,int8_dynamic,int8_weight_only,int4_weight_only]"
    result = gptforge("run", str(TINY_EXPERIMENT), *FAST_OVERRIDES, f"workdir={tmp_path}", variants,
                      "pretrain.use_gpu=true", "pretrain.num_workers=1", "finetune.use_gpu=true", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "<- champion" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`gptforge.stage` = 'candidate'")
    on_cuda = {r.data.tags["candidate.variant"]: r.data.metrics["eval/on_cuda"] for r in runs}
    # evaluate.device=auto: every variant that runs on CUDA is measured there; int8_dynamic stays on the CPU
    assert on_cuda == {"fp32": 1.0, "bf16": 1.0, "int8_dynamic": 0.0, "int8_weight_only": 1.0, "int4_weight_only": 1.0}

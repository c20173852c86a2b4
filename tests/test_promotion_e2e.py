"""Two tiny pipeline runs through the real CLI (real Ray, MLflow SQLite): a retrain on a damaged corpus
is measured beside the champion and not promoted."""
import random

import pytest
from mlflow import MlflowClient

from pipelines.registry import CHAMPION
from tests.helpers import JOB_OVERRIDES, TINY_EXPERIMENT, gptforge

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two pipeline runs: ~5 minutes on 2 cores


def _damaged_corpus(folder, files=40, chars=10_000, seed=0):
    """Text files of random printable characters: a corpus broken on purpose (nothing in it is code)."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"] * 4
    folder.mkdir()
    for i in range(files):
        (folder / f"noise_{i:03d}.txt").write_text("".join(rng.choices(alphabet, k=chars)))
    return folder


def test_a_retrain_on_a_damaged_corpus_is_not_promoted(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    overrides = [*JOB_OVERRIDES, f"workdir={workdir}", "promote.metric=eval/val_bpb"]
    first = gptforge("run", str(TINY_EXPERIMENT), *overrides, cwd=workdir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    noise = _damaged_corpus(tmp_path / "noise")
    second = gptforge("run", str(TINY_EXPERIMENT), *overrides, f"data.source={noise}", cwd=workdir)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    champion = client.get_model_version_by_alias("tiny", CHAMPION)
    versions = sorted(client.search_model_versions("name='tiny'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == ["1", "2"] and str(champion.version) == "1"
    lost = versions[1]
    reason = lost.tags["promote.reason"]
    assert lost.tags["promote.decision"] == "challenger_lost", reason
    assert "eval/val_bpb" in reason and "champion v1" in reason
    assert "trained on other data and with another tokenizer; it takes part" in reason
    experiment = client.get_experiment_by_name("tiny")
    (reeval,) = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'champion-reeval'")
    assert reeval.info.status == "FINISHED" and reeval.data.metrics["eval/val_bpb"] > 0
    seconds = (reeval.info.end_time - reeval.info.start_time) / 1000
    print(f"\nchampion re-evaluation: {seconds:.1f} s; decision: {reason}")

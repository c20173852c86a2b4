"""The champion is re-evaluated beside the challenger: real MLflow SQLite store, real model folders, no Ray."""
import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient
from tokenizers import Tokenizer

from components.bpb import bpb_metrics
from components.experiment_file import load_config
from components.quantize import load_variant
from components.tokenizer import TOKENIZER_FILE
from pipelines import promotion, registry
from pipelines.registry import CHAMPION
from pipelines.tracking import Tracker
from tests.helpers import heldout_data, make_candidate, promote_candidates

pytestmark = pytest.mark.integration

OTHER_TEXTS = ("import os\nprint(os.getcwd())\n", "class Stack:\n    pass\n", "naïve = 'ünïcödé'\n")


@pytest.fixture
def store(tmp_path):
    store = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "cfg": load_config(None, ["name=sidebyside", "evaluate.tasks=[]"]), "tmp": tmp_path}
    store["tracker"] = Tracker(store["uri"], "sidebyside", artifact_location=str(tmp_path / "artifacts"))
    first, store["v1"] = promote_candidates(store["tracker"], store["cfg"], tmp_path, {"fp32": 10.0})
    assert first.promote and "no comparable champion" in first.reason
    return store


def _measured(tmp_path, seed, data, cfg):
    folder = tmp_path / f"direct-{seed}"
    make_candidate(folder, "fp32", seed)  # the same weights as the registered candidate of that seed
    return bpb_metrics(load_variant(str(folder)), Tokenizer.from_file(str(folder / TOKENIZER_FILE)), data, cfg.evaluate)


def _runs(tracker, name):
    return tracker.client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'")


def test_a_worse_challenger_on_other_data_loses_to_the_champion_measured_beside_it(store):
    tracker, cfg, tmp = store["tracker"], store["cfg"], store["tmp"]
    other = heldout_data(tmp / "other-data", fingerprint="fp-2", tokenizer_texts=OTHER_TEXTS, texts=OTHER_TEXTS)
    # Stands in for a model trained on a broken corpus: its own held-out text scores badly.
    decision, v2 = promote_candidates(tracker, cfg, tmp, {"fp32": 1.0}, data=other,
                                      metrics={"fp32": {"eval/suite_bpb": 50.0}})
    assert not decision.promote
    assert "eval/suite_bpb=50" in decision.reason and "is better" in decision.reason
    assert "trained on other data and with another tokenizer; it takes part" in decision.reason
    assert registry.alias_version(store["uri"], cfg.name, CHAMPION).version == store["v1"]
    assert registry.model_version(store["uri"], cfg.name, v2).tags["promote.decision"] == "challenger_lost"

    (reeval,) = _runs(tracker, "champion-reeval")  # the first promotion had no champion to re-evaluate
    pipeline = tracker.client.get_run(reeval.data.tags["mlflow.parentRunId"])
    assert pipeline.info.run_name == f"{cfg.name}-pipeline" and pipeline.data.tags["promote.version"] == str(v2)
    expected = _measured(tmp, 0, other, cfg)  # the champion's weights, its own tokenizer, the challenger's text
    assert reeval.data.metrics["eval/val_bpb"] == pytest.approx(expected["eval/val_bpb"], rel=1e-6)
    assert reeval.data.metrics["eval/completion_bpb"] == pytest.approx(expected["eval/completion_bpb"], rel=1e-6)
    assert reeval.data.tags["reeval.version"] == str(store["v1"]) and reeval.data.tags["reeval.same_tokenizer"] == "false"

    # The promote run holds the two side by side: every metric both have, both values and the change.
    promote_run = _runs(tracker, "promote")[0]
    table = json.loads(Path(tracker.client.download_artifacts(promote_run.info.run_id, "challenger_vs_champion.json",
                                                              str(tmp / "table"))).read_text())
    bpb = next(r for r in table if r["metric"] == "eval/suite_bpb")  # the suite here: the challenger's held-out text
    assert bpb["challenger"] == 50.0 and bpb["champion"] == pytest.approx(expected["eval/val_bpb"], rel=1e-6)
    assert bpb["delta"] == pytest.approx(50.0 - expected["eval/val_bpb"], rel=1e-6)
    plot = Path(tracker.client.download_artifacts(promote_run.info.run_id, "challenger_vs_champion.png", str(tmp / "p")))
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_a_challenger_that_fails_the_completion_gate_is_registered_as_lost(store):
    tracker, cfg = store["tracker"], store["cfg"]
    decision, v2 = promote_candidates(tracker, cfg, store["tmp"], {"fp32": 1.0},
                                      metrics={"fp32": {"eval/suite_bpb": 0.1, "eval/suite_completion_bpb": 99.0}})
    assert not decision.promote
    assert "failed the gate on eval/suite_completion_bpb" in decision.reason
    assert "eval/suite_completion_bpb 99 vs champion" in decision.reason and "FAILED" in decision.reason
    tags = registry.model_version(store["uri"], cfg.name, v2).tags
    assert tags["promote.decision"] == "challenger_lost" and "max_completion_bpb_regression_pct" in tags["promote.reason"]


def test_promote_version_measures_both_side_by_side(store):
    tracker, cfg, tmp = store["tracker"], store["cfg"], store["tmp"]
    data = heldout_data(tmp / "data")
    _, v2 = promote_candidates(tracker, cfg, tmp, {"fp32": 1.0}, seed=1, metrics={"fp32": {"eval/suite_bpb": 50.0}})
    decision, outcome = promotion.promote_version(tracker, cfg, v2)
    # No suite is pinned for this experiment: both are measured on v2's own held-out data.
    ours, theirs = _measured(tmp, 1, data, cfg)["eval/val_bpb"], _measured(tmp, 0, data, cfg)["eval/val_bpb"]
    assert f"eval/suite_bpb={ours:.4g}" in decision.reason and f"{theirs:.4g}" in decision.reason  # not the logged 50
    assert outcome == ("promoted" if decision.promote else "kept")
    assert _runs(tracker, f"v{v2}-reeval") and len(_runs(tracker, "champion-reeval")) == 2


def test_a_champion_whose_files_fail_their_check_is_kept(store):
    tracker, cfg = store["tracker"], store["cfg"]
    version = registry.find_alias(store["uri"], cfg.name)
    stored = os.path.join(MlflowClient(store["uri"]).get_run(version.run_id).info.artifact_uri.removeprefix("file://"),
                          promotion.MODEL_ARTIFACT)
    other = store["tmp"] / "tampered"
    make_candidate(other, "fp32", seed=3)
    shutil.copy(other / "model.safetensors", os.path.join(stored, "model.safetensors"))
    decision, _ = promote_candidates(tracker, cfg, store["tmp"], {"fp32": 1.0})
    assert not decision.promote and "could not be re-evaluated" in decision.reason and "sha256" in decision.reason
    assert registry.alias_version(store["uri"], cfg.name, CHAMPION).version == store["v1"]

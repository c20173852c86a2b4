"""The promotion decision (pure) and the registry side effect on a real MLflow SQLite store."""
import pytest

from components.config import PromoteConfig
from components.promote import Candidate, check_gates, decide
from pipelines import registry
from pipelines.registry import CHAMPION, PREVIOUS
from pipelines.tracking import Tracker


def Policy(**fields):
    """The promotion policy with the default metric and no gates (the gates have tests of their own)."""
    return PromoteConfig(**{"max_completion_bpb_regression_pct": None, **fields})


def c(name, value, size):
    return Candidate(name, {"eval/val_ppl": value, "eval/suite_bpb": value, "model/size_bytes": size})


def test_best_metric_wins():
    d = decide([c("fp32", 10.0, 100), c("int8", 12.0, 30)], None, Policy())
    assert d.winner.name == "fp32" and d.promote


def test_tie_goes_to_the_smaller_model():
    d = decide([c("fp32", 10.0, 100), c("int8", 10.05, 30)], None, Policy(tie_tolerance=0.01))
    assert d.winner.name == "int8"
    assert "tied" in d.reason


def test_mode_max():
    policy = Policy(metric="eval/acc", mode="max")
    a = Candidate("a", {"eval/acc": 0.5, "model/size_bytes": 1})
    b = Candidate("b", {"eval/acc": 0.9, "model/size_bytes": 2})
    assert decide([a, b], None, policy).winner.name == "b"


def test_better_incumbent_is_kept():
    d = decide([c("fp32", 12.0, 100)], c("v1", 10.0, 100), Policy())
    assert not d.promote and "kept" in d.reason
    d = decide([c("fp32", 9.0, 100)], c("v1", 10.0, 100), Policy())
    assert d.promote


def test_missing_metric_names_candidate_and_key():
    with pytest.raises(ValueError, match=r"'int8'.*eval/suite_bpb"):
        decide([Candidate("int8", {})], None, Policy())


def test_champion_and_previous_aliases(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "aliases", artifact_location=str(tmp_path / "art"))
    versions = []
    for i in range(2):
        with tracker.run(f"candidate-{i}") as run:
            folder = tmp_path / f"m{i}"
            folder.mkdir()
            (folder / "weights.txt").write_text(str(i))
            run.log_artifacts(str(folder), "model")
        versions.append(registry.register(uri, "aliases", run.run_id, "model", {"run_id": run.run_id}))
        registry.move_champion(uri, "aliases", versions[-1])
    assert registry.alias_version(uri, "aliases", CHAMPION).version == versions[1]
    assert registry.alias_version(uri, "aliases", PREVIOUS).version == versions[0]


def test_failed_stage_leaves_no_run_running(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "failures", artifact_location=str(tmp_path / "art"))
    with pytest.raises(RuntimeError):
        with tracker.run("parent") as parent:
            candidate = tracker.open_run("candidate", parent)
            with tracker.run("stage", parent):
                raise RuntimeError("boom")
    statuses = {tracker.client.get_run(r).info.status for r in (parent.run_id, candidate.run_id)}
    assert statuses == {"FAILED"}


def _cand(name, value, size, speed):
    return Candidate(name, {"eval/suite_bpb": value, "model/size_bytes": size, "eval/tokens_per_s": speed})


CANDIDATES = [_cand("fp32", 10.0, 100, 50.0), _cand("bf16", 10.01, 50, 40.0), _cand("int8", 10.15, 28, 95.0),
              _cand("int4", 10.9, 18, 120.0)]


def test_smallest_within_one_percent_of_the_best():
    d = decide(CANDIDATES, None, Policy(tie_tolerance=0.01, tie_breaker="model/size_bytes"))
    assert d.winner.name == "bf16"  # int8 is 1.5% worse: outside the tolerance
    assert "lower model/size_bytes wins" in d.reason


def test_fastest_within_two_percent_of_the_best():
    d = decide(CANDIDATES, None, Policy(tie_tolerance=0.02, tie_breaker="eval/tokens_per_s", tie_breaker_mode="max"))
    assert d.winner.name == "int8"  # int4 is faster but 9% worse
    assert "higher eval/tokens_per_s wins" in d.reason


def test_a_candidate_without_the_tie_breaker_loses_the_tie():
    no_speed = Candidate("odd", {"eval/suite_bpb": 10.0, "model/size_bytes": 1})
    d = decide([no_speed, *CANDIDATES[:2]], None,
               Policy(tie_tolerance=0.01, tie_breaker="eval/tokens_per_s", tie_breaker_mode="max"))
    assert d.winner.name == "fp32"


def test_the_default_metric_is_bits_per_byte_and_the_completion_gate_is_on():
    policy = PromoteConfig()
    assert (policy.metric, policy.mode) == ("eval/suite_bpb", "min")
    assert policy.max_completion_bpb_regression_pct == 5.0 and policy.max_size_growth_pct is None


def _bpb(name, val, completion, size=100.0):
    return Candidate(name, {"eval/suite_bpb": val, "eval/suite_completion_bpb": completion, "model/size_bytes": size})


def test_a_challenger_that_fails_a_gate_is_not_promoted_and_every_gate_is_listed():
    policy = PromoteConfig(max_completion_bpb_regression_pct=5.0, max_size_growth_pct=10.0)
    champion = _bpb("v1", 2.0, 1.0, size=100.0)
    d = decide([_bpb("fp32", 1.5, 1.2, size=105.0)], champion, policy)  # better bpb, completions 20% worse
    assert not d.promote
    assert "failed the gate on eval/suite_completion_bpb" in d.reason
    assert "eval/suite_completion_bpb 1.2 vs champion 1 (+20.0%, max_completion_bpb_regression_pct=5%: FAILED)" in d.reason
    assert "model/size_bytes 105 vs champion 100 (+5.0%, max_size_growth_pct=10%: passed)" in d.reason
    d = decide([_bpb("fp32", 1.5, 1.04, size=105.0)], champion, policy)  # within both limits
    assert d.promote and "passed" in d.reason and "FAILED" not in d.reason


def test_gates_are_listed_when_the_metric_already_keeps_the_champion():
    d = decide([_bpb("fp32", 3.0, 1.0)], _bpb("v1", 2.0, 1.0), PromoteConfig())
    assert not d.promote and "is better" in d.reason and "eval/suite_completion_bpb 1 vs champion 1" in d.reason


def test_a_gate_that_cannot_be_checked_fails():
    (gate,) = check_gates(Candidate("fp32", {"eval/suite_bpb": 1.0}), _bpb("v1", 2.0, 1.0), PromoteConfig())
    assert not gate.passed and "not measured on fp32" in gate.text
    assert check_gates(_bpb("a", 1, 1), _bpb("b", 1, 1), PromoteConfig(max_completion_bpb_regression_pct=None)) == []


def test_side_by_side_lists_every_shared_metric_with_both_values_and_the_change():
    from components.promote import side_by_side, side_by_side_markdown

    rows = side_by_side(Candidate("fp32", {"eval/suite_bpb": 2.0, "model/size_bytes": 0.0, "only/new": 1.0}),
                        Candidate("v1", {"eval/suite_bpb": 2.5, "model/size_bytes": 0.0, "only/old": 1.0}))
    assert [r["metric"] for r in rows] == ["eval/suite_bpb", "model/size_bytes"]
    assert rows[0] == {"metric": "eval/suite_bpb", "challenger": 2.0, "champion": 2.5, "delta": -0.5, "delta_pct": -20.0}
    assert rows[1]["delta_pct"] is None  # no percentage of a zero
    table = side_by_side_markdown(rows, "fp32", "v1")
    assert "| eval/suite_bpb | 2 | 2.5 | -0.5 | -20.00 |" in table and "fp32 (challenger)" in table


def _tasks(name, acc, acc_norm, bpb=1.0):
    task = "eval/task/gptforge_which_body"
    return Candidate(name, {"eval/suite_bpb": bpb, f"{task}/acc": acc, f"{task}/acc_norm": acc_norm,
                            f"{task}/acc_stderr": 0.05, f"{task}/items": 64})


def test_a_challenger_more_than_the_limit_below_the_champion_on_a_task_accuracy_is_not_promoted():
    policy = Policy(metric="eval/suite_bpb", max_task_accuracy_drop_points=2.0)
    champion = _tasks("v1", 0.40, 0.50, bpb=2.0)
    d = decide([_tasks("fp32", 0.39, 0.47)], champion, policy)  # better bpb, acc_norm 3 points lower
    assert not d.promote and "failed the gate on eval/task/gptforge_which_body/acc_norm" in d.reason
    assert ("eval/task/gptforge_which_body/acc_norm 0.47 vs champion 0.5 (-3.0 points, "
            "max_task_accuracy_drop_points=2: FAILED)") in d.reason
    assert ("eval/task/gptforge_which_body/acc 0.39 vs champion 0.4 (-1.0 points, "
            "max_task_accuracy_drop_points=2: passed)") in d.reason
    assert "acc_stderr" not in d.reason and "/items" not in d.reason  # only accuracies are gated
    d = decide([_tasks("fp32", 0.385, 0.481)], champion, policy)  # 1.5 and 1.9 points lower: within the limit
    assert d.promote and "FAILED" not in d.reason
    gate_off = Policy(metric="eval/suite_bpb", max_task_accuracy_drop_points=None)
    assert decide([_tasks("fp32", 0.10, 0.10)], champion, gate_off).promote


def test_the_task_gate_is_on_by_default_and_fails_when_the_champion_has_no_task_scores():
    assert PromoteConfig().max_task_accuracy_drop_points == 10.0
    gates = check_gates(_tasks("fp32", 0.3, 0.3), Candidate("v1", {"eval/suite_bpb": 2.0}), Policy())
    assert [g.passed for g in gates] == [False, False]
    assert "eval/task/gptforge_which_body/acc not measured on v1 (max_task_accuracy_drop_points=10)" in gates[0].text
    assert check_gates(Candidate("fp32", {"eval/suite_bpb": 1.0}), _tasks("v1", 0.3, 0.3), Policy()) == []  # no tasks run

"""The promotion decision as a pure function: candidates + incumbent + policy -> decision.

Moving the registry alias is the pipeline's job (pipelines/tracking.py); this
module only decides, so the policy can be tested without MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass

from components.config import PromoteConfig


@dataclass(frozen=True)
class Candidate:
    """A model that may become champion: a name (variant or registry version) and its metrics."""

    name: str
    metrics: dict


@dataclass(frozen=True)
class Decision:
    """`winner` is the best new candidate; `promote` says whether it replaces the incumbent."""

    winner: Candidate
    promote: bool
    reason: str


def decide(candidates: list[Candidate], incumbent: Candidate | None, policy: PromoteConfig) -> Decision:
    """Pick the best candidate and whether it should replace the incumbent champion.

    The best candidate has the best `policy.metric`; candidates within
    `tie_tolerance` (relative) of it are tied, and the tie goes to the best
    `tie_breaker` in `tie_breaker_mode` (by default the smallest model; with
    `eval/tokens_per_s` and `max`, the fastest). So a policy can trade a bounded
    loss of quality for size or speed. It is promoted unless the incumbent is
    better by more than the tolerance, or it fails a regression gate (`check_gates`)
    against the incumbent; the reason then lists every gate with both values. The
    incumbent's metrics are meant to be measured beside the candidates' (same text,
    same code, same settings).

    Raises:
        ValueError: no candidates, or a candidate lacks the metric.
    """
    if not candidates:
        raise ValueError("no candidates to promote")
    for c in candidates:
        if policy.metric not in c.metrics:
            raise ValueError(f"candidate {c.name!r} has no metric {policy.metric!r} (promote.metric)")
    sign = 1.0 if policy.mode == "min" else -1.0
    best_value = min(sign * c.metrics[policy.metric] for c in candidates)
    tied = [c for c in candidates if _within(sign * c.metrics[policy.metric], best_value, policy.tie_tolerance)]
    tie_sign = 1.0 if policy.tie_breaker_mode == "min" else -1.0
    winner = min(tied, key=lambda c: (tie_sign * c.metrics.get(policy.tie_breaker, tie_sign * float("inf")),
                                      sign * c.metrics[policy.metric]))
    value = winner.metrics[policy.metric]
    why = f"{winner.name}: {policy.metric}={value:.4g}"
    if len(tied) > 1:
        others = ", ".join(c.name for c in tied if c is not winner)
        direction = "lower" if policy.tie_breaker_mode == "min" else "higher"
        why += f" (tied within {policy.tie_tolerance:.0%} with {others}; {direction} {policy.tie_breaker} wins)"
    if incumbent is None:
        return Decision(winner, True, why + "; no comparable champion yet")
    gates = check_gates(winner, incumbent, policy)
    gate_text = "; gates: " + ", ".join(g.text for g in gates) if gates else ""
    failed = [g.metric for g in gates if not g.passed]
    if policy.metric not in incumbent.metrics:
        why += f"; champion {incumbent.name} has no comparable {policy.metric}"
    else:
        incumbent_value = incumbent.metrics[policy.metric]
        if sign * incumbent_value < sign * value and not _within(sign * value, sign * incumbent_value,
                                                                 policy.tie_tolerance):
            return Decision(winner, False, why + f"; champion {incumbent.name} is better ({incumbent_value:.4g}), "
                                                 f"kept" + gate_text)
        why += f"; champion {incumbent.name} had {incumbent_value:.4g}"
    if failed:
        return Decision(winner, False, why + f"; failed the gate on {', '.join(failed)}, champion {incumbent.name} "
                                             f"kept" + gate_text)
    return Decision(winner, True, why + gate_text)


@dataclass(frozen=True)
class GateResult:
    """One regression gate applied to a challenger and the champion measured beside it."""

    metric: str
    passed: bool
    text: str  # the metric, both values and the limit, for the decision's reason


# (PromoteConfig field holding the limit in percent, the metric it bounds); for every one a higher
# value is worse, so the challenger may exceed the champion by at most the limit.
GATES = (("max_completion_bpb_regression_pct", "eval/suite_completion_bpb"),
         ("max_size_growth_pct", "model/size_bytes"))


def check_gates(challenger: Candidate, champion: Candidate, policy: PromoteConfig) -> list[GateResult]:
    """Every gate that `policy` turns on (its limit is set), applied to the challenger against the champion.

    A gate fails when the challenger's value is more than the limit (in percent) above the champion's,
    or when either side lacks the metric (a gate that could not be checked never lets a model through).
    The task gate (`max_task_accuracy_drop_points`) applies to every task accuracy the challenger has
    (`task_accuracy_metrics`, the tasks of evaluate.tasks): it fails when the challenger's is more than
    the limit, in percentage points, below the champion's, or when the champion has none to compare.
    """
    results = []
    for field, metric in GATES:
        limit = getattr(policy, field)
        if limit is None:
            continue
        ours, theirs = challenger.metrics.get(metric), champion.metrics.get(metric)
        if ours is None or theirs is None:
            side = challenger.name if ours is None else champion.name
            results.append(GateResult(metric, False, f"{metric} not measured on {side} ({field}={limit:g}%)"))
            continue
        change = 100.0 * (ours / theirs - 1.0) if theirs else (0.0 if ours == theirs else float("inf"))
        passed = ours <= theirs + abs(theirs) * limit / 100.0
        results.append(GateResult(metric, passed, f"{metric} {ours:.4g} vs champion {theirs:.4g} ({change:+.1f}%, "
                                                  f"{field}={limit:g}%: {'passed' if passed else 'FAILED'})"))
    if policy.max_task_accuracy_drop_points is not None:
        results += _task_accuracy_gates(challenger, champion, policy.max_task_accuracy_drop_points)
    return results


# The task scores (eval/task/<task>/<name>, `<name>.<filter>` for a filtered one) that are accuracies
# in [0, 1]: the task gate bounds their drop in percentage points.
TASK_ACCURACIES = ("acc", "acc_norm", "exact_match")


def task_accuracy_metrics(metrics: dict) -> list[str]:
    """The task accuracies among `metrics`' names, sorted."""
    return sorted(k for k in metrics if k.startswith("eval/task/")
                  and k.rsplit("/", 1)[-1].split(".", 1)[0] in TASK_ACCURACIES)


def _task_accuracy_gates(challenger: Candidate, champion: Candidate, limit: float) -> list[GateResult]:
    """max_task_accuracy_drop_points on every task accuracy the challenger has; one the champion lacks fails."""
    field, results = "max_task_accuracy_drop_points", []
    for metric in task_accuracy_metrics(challenger.metrics):
        ours, theirs = challenger.metrics[metric], champion.metrics.get(metric)
        if theirs is None:
            results.append(GateResult(metric, False, f"{metric} not measured on {champion.name} ({field}={limit:g})"))
            continue
        drop = 100.0 * (theirs - ours)
        passed = drop <= limit
        results.append(GateResult(metric, passed, f"{metric} {ours:.4g} vs champion {theirs:.4g} ({-drop:+.1f} "
                                                  f"points, {field}={limit:g}: {'passed' if passed else 'FAILED'})"))
    return results


def _within(value: float, best: float, tolerance: float) -> bool:
    return value <= best + abs(best) * tolerance


def side_by_side(challenger: Candidate, champion: Candidate) -> list[dict]:
    """Every metric both logged: the two values and the challenger's change, absolute and in percent
    (None where the champion's value is 0). Sorted by name: the table the promote run stores."""
    rows = []
    for name in sorted(set(challenger.metrics) & set(champion.metrics)):
        new, old = float(challenger.metrics[name]), float(champion.metrics[name])
        rows.append({"metric": name, "challenger": new, "champion": old, "delta": new - old,
                     "delta_pct": (new - old) / abs(old) * 100 if old else None})
    return rows


def side_by_side_markdown(rows: list[dict], challenger: str, champion: str) -> str:
    lines = [f"| metric | {challenger} (challenger) | {champion} (champion) | delta | delta % |",
             "|---|---|---|---|---|"]
    for r in rows:
        pct = "" if r["delta_pct"] is None else f"{r['delta_pct']:+.2f}"
        lines.append(f"| {r['metric']} | {r['challenger']:.6g} | {r['champion']:.6g} | {r['delta']:+.6g} | {pct} |")
    return "\n".join(lines) + "\n"

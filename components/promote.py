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
    better by more than the tolerance.

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
    if incumbent is None or policy.metric not in incumbent.metrics:
        return Decision(winner, True, why + "; no comparable champion yet")
    incumbent_value = incumbent.metrics[policy.metric]
    if sign * incumbent_value < sign * value and not _within(sign * value, sign * incumbent_value, policy.tie_tolerance):
        return Decision(winner, False, why + f"; champion {incumbent.name} is better ({incumbent_value:.4g}), kept")
    return Decision(winner, True, why + f"; champion {incumbent.name} had {incumbent_value:.4g}")


def _within(value: float, best: float, tolerance: float) -> bool:
    return value <= best + abs(best) * tolerance

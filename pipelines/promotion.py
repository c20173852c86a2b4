"""Promotion: the pure decision from `components/promote.py`, then the thin registry side effect.

The winner is registered as a new model version with its lineage in tags;
`champion` moves to it only when the decision says so (the old champion
becomes `previous`). A champion trained on other data (a different data
fingerprint) is not comparable by perplexity, so it does not take part in the
decision; the reason says so.

Any registry error other than "no champion yet" raises `TrackingError` before
anything moves: an unreachable registry must never look like an empty one.
"""
from __future__ import annotations

from components.artifacts import EvalReport, TokenizedData
from components.config import ExperimentConfig, config_hash
from components.promote import Candidate, Decision, decide
from pipelines.tracking import CHAMPION, CHECKSUMS_TAG, RunLogger, Tracker

MODEL_ARTIFACT = "model"


def promote(tracker: Tracker, cfg: ExperimentConfig, reports: list[EvalReport], runs: dict[str, RunLogger],
            data: TokenizedData, log: RunLogger) -> tuple[Decision, str | None]:
    """Decide, register the winner, move `champion` if it won. Returns (decision, registered version)."""
    candidates = [Candidate(r.variant, r.metrics) for r in reports]
    incumbent, note = _incumbent(tracker, cfg.name, data.fingerprint)
    decision = decide(candidates, incumbent, cfg.promote)
    winner_run = runs[decision.winner.name]
    checksums = tracker.run_tags(winner_run.run_id).get(CHECKSUMS_TAG)
    if not checksums:
        raise RuntimeError(f"candidate run {winner_run.run_id} has no {CHECKSUMS_TAG} tag, so its files "
                            f"cannot be pinned in the registry; it was not registered")
    version = tracker.register(cfg.name, winner_run.run_id, MODEL_ARTIFACT, tags={
        CHECKSUMS_TAG: checksums,
        "run_id": winner_run.run_id,
        "variant": decision.winner.name,
        "data.fingerprint": data.fingerprint,
        "config.hash": config_hash(cfg),
        cfg.promote.metric: decision.winner.metrics[cfg.promote.metric],
    })
    if decision.promote:
        tracker.move_champion(cfg.name, version)
    reason = decision.reason + (f" ({note})" if note else "")
    log.set_tags({"promote.winner": decision.winner.name, "promote.promoted": decision.promote,
                  "promote.reason": reason, "promote.version": version})
    return Decision(decision.winner, decision.promote, reason), version


def _incumbent(tracker: Tracker, model_name: str, fingerprint: str) -> tuple[Candidate | None, str]:
    current = tracker.alias_version(model_name, CHAMPION)
    if current is None:
        return None, ""
    if current.tags.get("data.fingerprint") != fingerprint:
        return None, f"champion v{current.version} was trained on other data, so it is not compared"
    return Candidate(f"v{current.version}", tracker.run_metrics(current.run_id)), ""


def comparison(reports: list[EvalReport]) -> list[dict]:
    """One row per candidate with every metric, for the evaluate run's candidates.json."""
    return [{"variant": r.variant, **r.metrics} for r in reports]

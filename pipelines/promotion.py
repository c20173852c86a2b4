"""Promotion: the pure decision from `components/promote.py`, then the thin registry side effect.

The winner is registered as a new model version with its lineage in tags;
`champion` moves to it only when the decision says so (the old champion
becomes `previous`). A champion trained on other data (a different data
fingerprint) is not comparable by perplexity, so it does not take part in the
decision; the reason says so.

Any registry error other than "no champion yet" raises `TrackingError` before
anything moves: an unreachable registry must never look like an empty one.

`gptforge promote EXPERIMENT --version N` runs the same champion/challenger
decision for a version already registered, and `--rollback` points `champion`
back at `previous`. Every decision is written on the version's tags
(`promote.decision`, `promote.reason`, `promote.at`); a running endpoint follows
the alias on its own (serve.poll_interval_s).
"""
from __future__ import annotations

import time

from components.artifacts import EvalReport, TokenizedData
from components.experiment_file import ExperimentConfig, config_hash
from components.promote import Candidate, Decision, decide
from pipelines import registry
from pipelines.registry import CHAMPION, CHECKSUMS_TAG, PREVIOUS
from pipelines.tracking import RunLogger, Tracker

MODEL_ARTIFACT = "model"


def _decision_tags(outcome: str, reason: str, by: str) -> dict:
    return {"promote.decision": outcome, "promote.reason": reason[:4000], "promote.by": by,
            "promote.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def promote(tracker: Tracker, cfg: ExperimentConfig, reports: list[EvalReport], runs: dict[str, RunLogger],
            data: TokenizedData, log: RunLogger, parent: RunLogger | None = None) -> tuple[Decision, str | None]:
    """Decide, register the winner, move `champion` if it won. Returns (decision, registered version).

    The decision and its reason go to the promote run, to `parent` (the pipeline run) when given,
    and to the registered version's tags.
    """
    candidates = [Candidate(r.variant, r.metrics) for r in reports]
    incumbent, note = _incumbent(tracker, cfg.name, data.fingerprint)
    decision = decide(candidates, incumbent, cfg.promote)
    winner_run = runs[decision.winner.name]
    checksums = tracker.run_tags(winner_run.run_id).get(CHECKSUMS_TAG)
    if not checksums:
        raise RuntimeError(f"candidate run {winner_run.run_id} has no {CHECKSUMS_TAG} tag, so its files "
                            f"cannot be pinned in the registry; it was not registered")
    version = registry.register(tracker.tracking_uri, cfg.name, winner_run.run_id, MODEL_ARTIFACT, tags={
        CHECKSUMS_TAG: checksums,
        "run_id": winner_run.run_id,
        "variant": decision.winner.name,
        "data.fingerprint": data.fingerprint,
        "config.hash": config_hash(cfg),
        cfg.promote.metric: decision.winner.metrics[cfg.promote.metric],
    })
    if decision.promote:
        registry.move_champion(tracker.tracking_uri, cfg.name, version)
    reason = decision.reason + (f" ({note})" if note else "")
    registry.set_version_tags(tracker.tracking_uri, cfg.name, version, _decision_tags(
        "champion" if decision.promote else "challenger_lost", reason, "pipeline"))
    tags = {"promote.winner": decision.winner.name, "promote.promoted": decision.promote,
            "promote.reason": reason, "promote.version": version}
    for run in (log, parent):
        if run is not None:
            run.set_tags(tags)
    return Decision(decision.winner, decision.promote, reason), version


def promote_version(tracker: Tracker, cfg: ExperimentConfig, version: str, force: bool = False) -> tuple[Decision, str]:
    """Champion/challenger for a registered version: it replaces `champion` only if it wins under `cfg.promote`.

    It is compared on the metrics its run logged (the same evaluation as the champion's when
    both were trained on the same data; otherwise it wins, as in a pipeline run). `force`
    skips the comparison. Returns the decision and what happened ("promoted", "kept", "already").

    Raises:
        LookupError: no such version. TrackingError: the registry failed (nothing moved).
    """
    challenger = registry.model_version(tracker.tracking_uri, cfg.name, version)
    current = registry.alias_version(tracker.tracking_uri, cfg.name, CHAMPION)
    name = f"v{challenger.version}"
    if current is not None and current.version == challenger.version:
        return Decision(Candidate(name, {}), False, f"{name} is already {CHAMPION}"), "already"
    metrics = tracker.run_metrics(challenger.run_id) if challenger.run_id else {}
    if force:
        decision = Decision(Candidate(name, metrics), True, f"{name} promoted by hand (--force), policy not applied")
    elif cfg.promote.metric not in metrics:
        raise LookupError(f"{cfg.name} {name}: its run has no metric {cfg.promote.metric!r} (promote.metric) to "
                          f"compare with the champion; use --force to promote it anyway")
    else:
        incumbent, note = _incumbent(tracker, cfg.name, challenger.tags.get("data.fingerprint", ""))
        decision = decide([Candidate(name, metrics)], incumbent, cfg.promote)
        if note:
            decision = Decision(decision.winner, decision.promote, f"{decision.reason} ({note})")
    if decision.promote:
        registry.move_champion(tracker.tracking_uri, cfg.name, challenger.version)
    outcome = "champion" if decision.promote else "challenger_lost"
    registry.set_version_tags(tracker.tracking_uri, cfg.name, challenger.version,
                              _decision_tags(outcome, decision.reason, "gptforge promote"))
    return decision, "promoted" if decision.promote else "kept"


def rollback(tracker: Tracker, cfg: ExperimentConfig) -> tuple[str, str]:
    """Point `champion` back at `previous` (and `previous` at the old champion). Returns (new, old) versions.

    Raises:
        LookupError: there is no `previous` (or no champion) to roll back to.
    """
    previous = registry.alias_version(tracker.tracking_uri, cfg.name, PREVIOUS)
    current = registry.alias_version(tracker.tracking_uri, cfg.name, CHAMPION)
    if previous is None or current is None:
        raise LookupError(f"nothing to roll back to: {cfg.name} has no {PREVIOUS!r} version "
                          f"(the alias is set when a champion is replaced)")
    registry.move_champion(tracker.tracking_uri, cfg.name, previous.version)  # the old champion becomes `previous`
    reason = f"rolled back from v{current.version}"
    registry.set_version_tags(tracker.tracking_uri, cfg.name, previous.version,
                              _decision_tags("rollback", reason, "gptforge promote --rollback"))
    return previous.version, current.version


def _incumbent(tracker: Tracker, model_name: str, fingerprint: str) -> tuple[Candidate | None, str]:
    current = registry.alias_version(tracker.tracking_uri, model_name, CHAMPION)
    if current is None:
        return None, ""
    if current.tags.get("data.fingerprint") != fingerprint:
        return None, f"champion v{current.version} was trained on other data, so it is not compared"
    return Candidate(f"v{current.version}", tracker.run_metrics(current.run_id)), ""

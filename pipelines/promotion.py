"""Promotion: the pure decision from `components/promote.py`, then the thin registry side effect.

The winner is registered as a new model version with its lineage in tags;
`champion` moves to it only when the decision says so (the old champion
becomes `previous`). The current champion is re-evaluated in the same run, on the
same held-out text, with the same code and settings (`pipelines/side_by_side.py`,
a `champion-reeval` run), so the decision compares numbers measured side by side.
Bits per byte compares across tokenizers, so a champion trained on other data or
with another tokenizer takes part too; the reason says so. A champion that cannot
be re-evaluated (files that fail their check, a variant that cannot run here) is
kept, with the reason.

Any registry error other than "no champion yet" raises `TrackingError` before
anything moves: an unreachable registry must never look like an empty one.

`gptforge promote EXPERIMENT --version N` runs the same side-by-side decision for a
version already registered (both measured on the held-out data that version was
trained with), and `--rollback` points `champion` back at `previous`. Every decision
is written on the version's tags (`promote.decision`, `promote.reason`, `promote.at`);
a running endpoint follows the alias on its own (serve.poll_interval_s).
"""
from __future__ import annotations

import time

from dataclasses import replace

from components.artifacts import EvalReport, TokenizedData, from_json, to_json
from components.experiment_file import ExperimentConfig, config_hash
from components.promote import Candidate, Decision, decide, side_by_side, side_by_side_markdown
from components.suite import Suite
from pipelines import registry, suites
from pipelines.init_from import lineage_tags
from pipelines.registry import CHAMPION, CHECKSUMS_TAG, PREVIOUS
from pipelines.side_by_side import Measured, measure_champion, measure_version
from pipelines.tracking import RunLogger, Tracker

MODEL_ARTIFACT = "model"
DATA_TAG = "data.record"  # the data stage's record (without its stats): where the version's held-out data is


def _decision_tags(outcome: str, reason: str, by: str) -> dict:
    return {"promote.decision": outcome, "promote.reason": reason[:4000], "promote.by": by,
            "promote.at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def promote(tracker: Tracker, cfg: ExperimentConfig, reports: list[EvalReport], runs: dict[str, RunLogger],
            data: TokenizedData, log: RunLogger, parent: RunLogger | None = None,
            suite: Suite | None = None) -> tuple[Decision, str | None]:
    """Decide, register the winner, move `champion` if it won. Returns (decision, registered version).

    The decision and its reason go to the promote run, to `parent` (the pipeline run) when given,
    and to the registered version's tags, with the evaluation `suite` it was judged on.
    """
    candidates = [Candidate(r.variant, r.metrics) for r in reports]
    champion = measure_champion(tracker, cfg, data, parent or log, suite)
    decision, note = _decide(tracker, cfg, candidates, champion, data.fingerprint, suite)
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
        DATA_TAG: to_json(replace(data, stats={})),
        **(suites.judged_on(suite) if suite else {}),
        cfg.promote.metric: decision.winner.metrics[cfg.promote.metric],
        **lineage_tags(tracker.run_tags((parent or log).run_id)),  # finetune.base*: what it was fine-tuned from
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
    if champion is not None and not champion.failed:
        _log_side_by_side(log, decision.winner, Candidate(champion.name, champion.metrics))
    return Decision(decision.winner, decision.promote, reason), version


def _log_side_by_side(log: RunLogger, challenger: Candidate, champion: Candidate) -> None:
    """The challenger against the champion, every metric both have, as artifacts of the promote run."""
    import os
    import tempfile

    from components.comparison import write_side_by_side_plot

    rows = side_by_side(challenger, champion)
    log.log_text(side_by_side_markdown(rows, challenger.name, champion.name), "challenger_vs_champion.md")
    log.log_dict(rows, "challenger_vs_champion.json")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "challenger_vs_champion.png")
        if write_side_by_side_plot(rows, challenger.name, champion.name, path):
            log.log_artifact(path)


def promote_version(tracker: Tracker, cfg: ExperimentConfig, version: str, force: bool = False) -> tuple[Decision, str]:
    """Champion/challenger for a registered version: it replaces `champion` only if it wins under `cfg.promote`.

    Both are measured now, side by side, on the held-out data the version was trained with
    (its `data.record` tag; the champion's when the version has none), each in a run of its
    own; metrics not measured that way come from the runs' logs. `force` skips the
    comparison. Returns the decision and what happened ("promoted", "kept", "already").

    Raises:
        LookupError: no such version, or no held-out data to measure on.
        TrackingError: the registry failed (nothing moved).
    """
    challenger = registry.model_version(tracker.tracking_uri, cfg.name, version)
    current = registry.alias_version(tracker.tracking_uri, cfg.name, CHAMPION)
    name = f"v{challenger.version}"
    if current is not None and current.version == challenger.version:
        return Decision(Candidate(name, {}), False, f"{name} is already {CHAMPION}"), "already"
    metrics = tracker.run_metrics(challenger.run_id) if challenger.run_id else {}
    if force:
        decision = Decision(Candidate(name, metrics), True, f"{name} promoted by hand (--force), policy not applied")
    else:
        data = _recorded_data(challenger) or (_recorded_data(current) if current is not None else None)
        if data is None:
            raise LookupError(f"{cfg.name} {name}: no {DATA_TAG} tag on it or on the champion (registered before "
                              f"promotion measured models side by side), so there is no held-out text to compare "
                              f"them on; use --force to promote it anyway")
        # Without a pinned suite (an experiment older than suites) both are judged on the version's own held-out data.
        suite = suites.current(tracker, cfg) or Suite(data.root, f"data-{data.fingerprint}")
        with tracker.run(f"promote-{name}", stage="promote") as log:
            measured = measure_version(tracker, cfg, data, log, challenger, suite)
            if measured.failed:
                raise LookupError(f"{cfg.name} {name} could not be measured: {measured.failed}")
            metrics = {**metrics, **measured.metrics}
            if cfg.promote.metric not in metrics:
                raise LookupError(f"{cfg.name} {name}: its run has no metric {cfg.promote.metric!r} "
                                  f"(promote.metric) to compare with the champion; use --force to promote it anyway")
            champion = measure_champion(tracker, cfg, data, log, suite)
            fingerprint = challenger.tags.get("data.fingerprint", "")
            decision, note = _decide(tracker, cfg, [Candidate(name, metrics)], champion, fingerprint, suite)
            if note:
                decision = Decision(decision.winner, decision.promote, f"{decision.reason} ({note})")
            log.set_tags({"promote.version": str(challenger.version), "promote.promoted": decision.promote,
                          "promote.reason": decision.reason[:4000]})
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


def _decide(tracker: Tracker, cfg: ExperimentConfig, candidates: list[Candidate], champion: Measured | None,
            fingerprint: str, suite: Suite | None = None) -> tuple[Decision, str]:
    """The decision against the champion measured side by side, and a note for its reason.

    Metrics the champion was not re-evaluated on come from its run's log, only when it was
    trained on the same data (`fingerprint`). A champion that could not be measured is kept.
    A champion registered under another evaluation suite is said so in the note.
    """
    if champion is None:
        return decide(candidates, None, cfg.promote), ""
    if champion.failed:
        best = decide(candidates, None, cfg.promote)
        reason = (f"{best.reason.split(';')[0]}; champion {champion.name} could not be re-evaluated "
                  f"({champion.failed}), so it is kept; `gptforge promote {cfg.name} --version N --force` promotes "
                  f"by hand")
        return Decision(best.winner, False, reason), ""
    current = registry.model_version(tracker.tracking_uri, cfg.name, champion.version)
    logged = {}
    if current.tags.get("data.fingerprint") == fingerprint and current.run_id:
        logged = tracker.run_metrics(current.run_id)
    incumbent = Candidate(champion.name, {**logged, **champion.metrics})
    note = "; ".join(n for n in (champion.note, suites.change_note(suite, current.tags) if suite else "") if n)
    if cfg.promote.metric not in champion.metrics:
        note = "; ".join(n for n in (note, f"{cfg.promote.metric} of {champion.name} as logged" if logged
                                     else f"{champion.name} has no comparable {cfg.promote.metric}") if n)
    return decide(candidates, incumbent, cfg.promote), note


def _recorded_data(version) -> TokenizedData | None:
    text = version.tags.get(DATA_TAG)
    return from_json(text) if text else None

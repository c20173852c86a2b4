"""The candidates' part of the pipeline: quantize every variant, evaluate each, compare, promote.

Every variant of `quantize.variants` becomes a candidate with an MLflow run of its
own (`candidate-<variant>`, nested in the pipeline's run), which both its quantize
and its evaluate task log to; the `quantize`, `evaluate` and `promote` runs hold
what concerns all candidates. `quantize` and `evaluate` run as Ray tasks, on a GPU
only where the variant needs or can use one.
"""
from __future__ import annotations

from dataclasses import replace

from components import checkpoint as ckpt
from components import comparison, storage
from components import evaluate as evaluate_lib
from components import quantize as quantize_lib
from components.artifacts import Checkpoint, EvalReport, QuantizedModel, TokenizedData
from components.experiment_file import ConfigError, ExperimentConfig
from components.files import write_checksums
from components.promote import Decision
from components.suite import Suite
from pipelines import promotion, ray_runtime
from pipelines.progress import Progress
from pipelines.registry import CHECKSUMS_TAG
from pipelines.tracking import RunLogger, Tracker

CANDIDATE_ARTIFACTS = "candidates"  # folder of the parent run holding the comparison


def quantize_evaluate_promote(cfg: ExperimentConfig, tracker: Tracker, parent: RunLogger, finetuned: Checkpoint,
                              data: TokenizedData, out_dir: str, params: dict,
                              progress: Progress, suite: Suite) -> tuple[list[EvalReport], Decision, str]:
    """Driver: the candidates from the fine-tuned model, measured and compared; the winner registered.

    Args:
        parent: the pipeline's run; every run opened here is nested in it.
        out_dir: the pipeline run's location on storage; candidates go to `candidates/<variant>`,
            the comparison to `comparison`.
        params: what every run logs (the config and the parameter counts).
        suite: the evaluation suite the candidates and the champion are judged on.

    Returns:
        (the report of every candidate, skipped ones too, in the order of quantize.variants;
        the promotion decision; the registry version of the winner)

    Raises:
        ConfigError: every candidate was skipped, so there is nothing to promote.
    """
    gpus = ray_runtime.cluster_gpus()
    progress.stage(f"quantize ({', '.join(cfg.quantize.variants)})")
    candidates: dict[str, tuple[RunLogger, QuantizedModel]] = {}
    with tracker.run("quantize", parent, stage="quantize", params=params) as log:
        for variant in cfg.quantize.variants:
            run = tracker.open_run(f"candidate-{variant}", parent, stage="candidate", params=params)
            run.set_tags({"data.fingerprint": data.fingerprint})
            model = ray_runtime.run_task(quantize, finetuned, variant, storage.join(out_dir, "candidates", variant),
                                         run, num_gpus=int(quantize_wants_gpu(variant, gpus)), on_worker_nodes=True)
            log.log_metrics({f"quantize/{variant}/size_bytes": model.size_bytes})
            candidates[variant] = (run, model)
            if model.skipped:
                progress.say(f"    {variant}: skipped ({model.skipped})")
    progress.done()
    runs = {variant: run for variant, (run, _) in candidates.items()}

    progress.stage("evaluate")
    reports = []
    with tracker.run("evaluate", parent, stage="evaluate", params=params) as log:
        for variant, (run, model) in candidates.items():
            report = ray_runtime.run_task(evaluate, model, data, cfg, run, suite.view(data), on_worker_nodes=True,
                                          num_gpus=int(evaluate_wants_gpu(variant, cfg, gpus)))
            reports.append(report)
            progress.say(f"    {variant}: " + (f"skipped ({report.skipped})" if report.skipped
                                                 else f"val ppl {report.metrics['eval/val_ppl']:.2f}"))
        reports = compare(reports, runs, storage.join(out_dir, "comparison"), log, parent)
        for run in runs.values():
            tracker.close_run(run)
    progress.done()

    progress.stage("promote")
    with tracker.run("promote", parent, stage="promote", params=params) as log:
        measured = [r for r in reports if not r.skipped]  # compare() made sure there is one
        decision, version = promotion.promote(tracker, cfg, measured, runs, data, log, parent, suite)
    progress.done(decision.reason)
    return reports, decision, version


def quantize_wants_gpu(variant: str, cluster_gpus: float) -> bool:
    """int4_weight_only is packed on the GPU; every other variant is built on a CPU."""
    return cluster_gpus > 0 and "cpu" not in quantize_lib.RUNS_ON[variant]


def evaluate_wants_gpu(variant: str, cfg: ExperimentConfig, cluster_gpus: float) -> bool:
    """Whether the candidate's evaluation task should hold a GPU (see evaluate.device)."""
    return cluster_gpus > 0 and cfg.evaluate.device != "cpu" and "cuda" in quantize_lib.RUNS_ON[variant]


def quantize(finetuned: Checkpoint, variant: str, out_location: str, logger: RunLogger) -> QuantizedModel:
    """Ray task: store the fine-tuned model as `variant`, with checksums, at `out_location`
    and in the candidate's run.

    A variant that cannot be built here is skipped: its run gets the reason, not an error.
    """
    import torch

    logger.set_tags({"candidate.variant": variant, "candidate.quantize_node": ray_runtime.node_id()})
    device = "cuda" if torch.cuda.is_available() and "cpu" not in quantize_lib.RUNS_ON[variant] else "cpu"
    source = storage.local_copy(finetuned.uri, check=lambda copy: ckpt.step_of(copy) is not None)
    try:
        with storage.staged(out_location) as out_dir:
            result = quantize_lib.quantize_model(str(source), variant, str(out_dir), device)
            # Tagged before the upload: promotion pins this value on the registry version (CHECKSUMS_TAG).
            logger.set_tags({CHECKSUMS_TAG: write_checksums(out_dir)})
            logger.log_artifacts(str(out_dir), "model")
    except quantize_lib.VariantUnavailable as why:
        logger.set_tags({"candidate.status": "skipped", "candidate.skip_reason": str(why)})
        return QuantizedModel(variant, "", 0, skipped=str(why))
    logger.log_params({"candidate.variant": variant})
    return replace(result, uri=storage.normalize(out_location))


def evaluate(candidate: QuantizedModel, data: TokenizedData, cfg: ExperimentConfig, logger: RunLogger,
             suite_view: TokenizedData | None = None) -> EvalReport:
    """Ray task: measure one candidate where it runs fastest; log its metrics, samples and generations.
    `suite_view`: the evaluation suite (`Suite.view`), for the metrics that compare across runs.

    The device follows `evaluate.device` (`components.quantize.pick_device`); on the CPU with
    `evaluate.cpu_threads` threads. A candidate that cannot run here is skipped, with the reason.
    """
    import torch

    if candidate.skipped:
        return EvalReport(candidate.variant, {}, skipped=candidate.skipped)
    e = cfg.evaluate
    try:
        device = quantize_lib.pick_device(candidate.variant, e.device, torch.cuda.is_available())
        folder = str(storage.local_copy(candidate.uri))  # checked against its checksums.json
        model = quantize_lib.load_variant(folder, device)
    except quantize_lib.VariantUnavailable as why:
        logger.set_tags({"candidate.status": "skipped", "candidate.skip_reason": str(why)})
        return EvalReport(candidate.variant, {}, skipped=str(why))
    torch.set_num_threads(e.cpu_threads)  # every CPU candidate gets the same threads, so tokens/s compare fairly
    report = evaluate_lib.evaluate(model, e, data, variant=candidate.variant, size_bytes=candidate.size_bytes,
                                   disk_bytes=quantize_lib.stored_bytes(folder), suite=suite_view)
    logger.log_metrics(report.metrics)
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    logger.set_tags({"candidate.status": "evaluated", "candidate.device": where,
                     "candidate.evaluate_node": ray_runtime.node_id()})
    logger.log_dict({"samples": report.samples, "generations": report.generations}, "samples.json")
    return report


def compare(reports: list[EvalReport], runs: dict[str, RunLogger], out_dir: str, log: RunLogger,
            parent: RunLogger) -> list[EvalReport]:
    """Driver: deltas against the reference on every candidate run; the table, plots and
    generations as artifacts of the evaluate run and of the parent run (`candidates/`).

    Returns:
        the reports with their deltas.

    Raises:
        ConfigError: every candidate was skipped, so there is nothing to promote.
    """
    if all(r.skipped for r in reports):
        raise ConfigError("every candidate was skipped (check quantize.variants and evaluate.device): "
                          + "; ".join(f"{r.variant}: {r.skipped}" for r in reports))
    reports = evaluate_lib.add_deltas(reports)
    reference = evaluate_lib.reference_variant(reports)
    for r in reports:
        if not r.skipped:
            runs[r.variant].log_metrics({k: r.metrics[k] for k in evaluate_lib.DELTA_METRICS})
            runs[r.variant].set_tags({"candidate.reference": str(r.variant == reference).lower()})
    with storage.staged(out_dir) as local_dir:
        for path in comparison.write_comparison(reports, str(local_dir)):
            log.log_artifact(path, CANDIDATE_ARTIFACTS)
            parent.log_artifact(path, CANDIDATE_ARTIFACTS)
    log.log_dict([{"variant": r.variant, "skipped": r.skipped, **r.metrics} for r in reports], "candidates.json")
    return reports

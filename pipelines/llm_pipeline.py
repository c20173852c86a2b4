"""The DAG: prepare_data → pretrain → finetune → quantize → evaluate → promote.

This file only wires stages together; what each stage does lives in
`pipelines/stages.py` (and below it, `components/`). Deploying the champion
is `pipelines/serving.py`, started by the CLI after the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.config import ExperimentConfig, flatten, to_yaml
from pipelines import promotion, stages
from pipelines.progress import Progress
from pipelines.ray_runtime import cluster_gpus, run_task
from pipelines.tracking import Tracker, resolve_tracking_uri


@dataclass(frozen=True)
class PipelineResult:
    run_id: str
    tracking_uri: str
    model_name: str
    reports: list  # EvalReport per candidate (skipped ones too), in the order of quantize.variants
    decision: object  # components.promote.Decision
    version: str  # registry version of the winner


def run_pipeline(cfg: ExperimentConfig, progress: Progress) -> PipelineResult:
    """Run every stage of `cfg` under one MLflow parent run. Ray must be initialised."""
    workdir = Path(cfg.workdir).resolve()
    tracker = Tracker(resolve_tracking_uri(cfg.workdir), cfg.name, artifact_location=str(workdir / "mlartifacts"))
    config_params = flatten(cfg)

    with tracker.run(f"{cfg.name}-pipeline", stage="pipeline", params=config_params) as parent:
        out = workdir / "runs" / parent.run_id
        parent.log_text(to_yaml(cfg), "experiment.yaml")
        progress.say(f"MLflow run {parent.run_id} in {tracker.run_url(parent.run_id) or tracker.tracking_uri}")

        # ------------------------------------------------------------ data
        progress.stage("prepare_data")
        with tracker.run("prepare_data", parent, stage="prepare_data", params=config_params) as log:
            data = progress.during(lambda: run_task(stages.prepare_data, cfg, str(out / "data"), log), log)
            counts = stages.parameter_count_params(stages.model_config(cfg, data))
            log.log_params(counts)
        parent.log_params(counts)
        params = {**config_params, **counts}  # every later run logs the config and the counts
        parent.set_tags({"data.fingerprint": data.fingerprint})
        progress.done(f"{data.stats['train_tokens']:,} train tokens, {data.stats['sft_train_pairs']:,} SFT pairs")

        # -------------------------------------------------------- training
        progress.stage(f"pretrain ({cfg.pretrain.num_workers} Ray Train workers, {counts['param_count.total']:,} params)")
        with tracker.run("pretrain", parent, stage="pretrain", params=params) as log:
            pretrained = progress.during(
                lambda: stages.pretrain(cfg, data, str(workdir / "ray_results"), log), log, cfg.pretrain.max_steps)
        progress.done()

        progress.stage(f"finetune ({cfg.finetune.method}, {cfg.finetune.num_workers} worker)")
        with tracker.run("finetune", parent, stage="finetune", params=params) as log:
            finetuned = progress.during(
                lambda: stages.finetune(cfg, data, pretrained, str(workdir / "ray_results"), log), log,
                cfg.finetune.max_steps)
        progress.done()

        # ------------------------------------------------------ candidates
        candidates = {}
        gpus = cluster_gpus()
        progress.stage(f"quantize ({', '.join(cfg.quantize.variants)})")
        with tracker.run("quantize", parent, stage="quantize", params=params) as log:
            for variant in cfg.quantize.variants:
                run = tracker.open_run(f"candidate-{variant}", parent, stage="candidate", params=params)
                run.set_tags({"data.fingerprint": data.fingerprint})
                model = run_task(stages.quantize, finetuned, variant, str(out / "candidates" / variant), run,
                                 num_gpus=int(stages.quantize_wants_gpu(variant, gpus)))
                log.log_metrics({f"quantize/{variant}/size_bytes": model.size_bytes})
                candidates[variant] = (run, model)
                if model.skipped:
                    progress.say(f"    {variant}: skipped ({model.skipped})")
        progress.done()

        progress.stage("evaluate")
        reports = []
        with tracker.run("evaluate", parent, stage="evaluate", params=params) as log:
            for variant, (run, model) in candidates.items():
                reports.append(run_task(stages.evaluate, model, data, cfg, run,
                                        num_gpus=int(stages.evaluate_wants_gpu(variant, cfg, gpus))))
                report = reports[-1]
                progress.say(f"    {variant}: " + (f"skipped ({report.skipped})" if report.skipped
                                                     else f"val ppl {report.metrics['eval/val_ppl']:.2f}"))
            runs = {variant: run for variant, (run, _) in candidates.items()}
            reports = stages.compare(reports, runs, str(out / "comparison"), log, parent)
            for run, _ in candidates.values():
                tracker.close_run(run)
        progress.done()

        # ------------------------------------------------------- promotion
        progress.stage("promote")
        with tracker.run("promote", parent, stage="promote", params=params) as log:
            runs = {variant: run for variant, (run, _) in candidates.items()}
            measured = [r for r in reports if not r.skipped]  # compare() made sure there is one
            decision, version = promotion.promote(tracker, cfg, measured, runs, data, log)
        progress.done(decision.reason)

    return PipelineResult(parent.run_id, tracker.tracking_uri, cfg.name, reports, decision, version)

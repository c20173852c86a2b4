"""The DAG: prepare_data → pretrain → finetune → quantize → evaluate → promote.

This file only wires stages together; what each stage does lives in
`pipelines/stages.py` and `pipelines/candidates.py` (and below them, `components/`). Deploying the champion
is `pipelines/serving.py`, started by the CLI after the run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from components import storage
from components.artifacts import from_json, to_json
from components.experiment_file import ExperimentConfig, flatten, to_yaml
from pipelines import candidates, init_from, ray_runtime, stage_cache, stages, suites
from pipelines.progress import Progress
from pipelines.run_queries import InterruptedRun, cached_outputs
from pipelines.tracking import CACHE_KEY_TAG, CACHED_FROM_TAG, RunLogger, Tracker, redact


@dataclass(frozen=True)
class PipelineResult:
    run_id: str
    tracking_uri: str
    model_name: str
    reports: list  # EvalReport per candidate (skipped ones too), in the order of quantize.variants
    decision: object  # components.promote.Decision
    version: str  # registry version of the winner


def run_pipeline(cfg: ExperimentConfig, progress: Progress, resume: InterruptedRun | None = None,
                 use_cache: bool = True, run_name: str | None = None) -> PipelineResult:
    """Run every stage of `cfg` under one MLflow parent run. Ray must be initialised.

    With `resume`, that interrupted run continues: stages it finished are reused from
    their recorded outputs, an interrupted training stage continues from its newest
    checkpoint in the same MLflow run, and the later stages run again.
    With `use_cache` (and the stage's `cache: true`), prepare_data, pretrain and finetune
    reuse a finished output recorded under the same stage key (pipelines/stage_cache.py).
    """
    root = storage_root(cfg)
    ray_runtime.check_storage(root)  # before any run opens: a bad location leaves nothing behind
    tracker = Tracker.for_experiment(cfg)
    config_params = flatten(cfg)
    base = init_from.resolve(cfg, tracker.tracking_uri, root)  # finetune.init_from; None: the pretrained model
    data_cfg = init_from.with_base_tokenizer(cfg, base)  # a starting model brings its tokenizer
    suite = suites.current(tracker, cfg)  # what every candidate and the champion are judged on; None: pin one

    with tracker.run(run_name or f"{cfg.name}-pipeline", stage="pipeline", params=config_params,
                     reopen=resume.run_id if resume else None) as parent:
        out = storage.join(root, "runs", parent.run_id)  # every stage's output goes below
        if not resume:
            parent.log_text(to_yaml(cfg), "experiment.yaml")
        progress.say(f"MLflow run {parent.run_id} in {tracker.run_url(parent.run_id) or redact(tracker.tracking_uri)}"
                     + ("  (resumed)" if resume else ""))
        progress.say(f"stage outputs in {redact(out)}")
        stage = StageRunner(tracker, parent, progress, resume, cfg if use_cache else None)
        data_key = _data_key(data_cfg, stages.source_fingerprint(cfg), suite)
        base_shape = init_from.model_config(base)
        if base is not None:
            progress.say(f"fine-tuning starts from {redact(base.source)} ({base.kind}, {redact(base.uri)})")

        # ------------------------------------------------------------ data
        progress.stage("prepare_data")
        data = stage.run("prepare_data", config_params,
                         lambda log: stages.prepare_data(data_cfg, storage.join(out, "prepare_data"), log, base_shape,
                                                         suite),
                         key=data_key)
        counts = stages.parameter_count_params(base_shape or stages.model_config(cfg, data))
        parent.log_params(counts)
        params = {**config_params, **counts}  # every later run logs the config and the counts
        if suite is None:
            suite = suites.pin_first(tracker, data, root, parent, data_key, params)
            progress.say(f"    pinned the evaluation suite {suite.short}: this run's held-out documents and pairs")
        parent.set_tags(suites.judged_on(suite))
        parent.set_tags({"data.fingerprint": data.fingerprint})
        progress.done(f"{data.stats['train_tokens']:,} train tokens, {data.stats['sft_train_pairs']:,} SFT pairs")

        # -------------------------------------------------------- training
        pt, ft = cfg.pretrain, cfg.finetune
        if pt.enabled:
            progress.stage(f"pretrain ({pt.strategy}, {pt.num_workers} Ray Train workers, "
                           f"{counts['param_count.total']:,} params)")
            pretrain_key = stage_cache.stage_key("pretrain", cfg, (data_key,))
            pretrained = stage.run("pretrain", params,
                                   lambda log: stages.pretrain(cfg, data, storage.join(out, "pretrain"), log),
                                   pt.max_steps, key=pretrain_key)
            base = init_from.pretrained(stage.run_ids.get("pretrain", ""), pretrained.uri, pretrain_key)
            progress.done()
        else:
            progress.say("pretrain: skipped (pretrain.enabled: false)")
        parent.set_tags(base.tags())

        progress.stage(f"finetune ({ft.method}, {ft.num_workers} worker{'s' if ft.num_workers > 1 else ''})")
        finetuned = stage.run("finetune", params,
                              lambda log: stages.finetune(cfg, data, base.checkpoint(), storage.join(out, "finetune"),
                                                          log, base.tags()),
                              ft.max_steps,
                              key=stage_cache.stage_key("finetune", cfg, (data_key, base.key)))
        progress.done()

        # ---------------------------------------- candidates and promotion
        reports, decision, version = candidates.quantize_evaluate_promote(cfg, tracker, parent, finetuned, data,
                                                                          out, params, progress, suite)

    return PipelineResult(parent.run_id, tracker.tracking_uri, cfg.name, reports, decision, version)


def _data_key(data_cfg: ExperimentConfig, source_fingerprint: str, suite) -> str:
    """The data stage's cache key. The suite is part of it only where it can change the output: a
    suite pinned from this very data stage already lies on its held-out side."""
    plain = stage_cache.stage_key("prepare_data", data_cfg, data_fingerprint=source_fingerprint)
    if suite is None or suite.data_key == plain:
        return plain
    return stage_cache.stage_key("prepare_data", data_cfg, (suite.sha256,), data_fingerprint=source_fingerprint)


def storage_root(cfg: ExperimentConfig) -> str:
    """Where the stages write: `storage`, else the workdir (as an absolute path)."""
    return storage.normalize(cfg.storage or cfg.workdir)


class StageRunner:
    """Runs a stage in its own nested MLflow run and records its output under its cache key, or
    reuses an output: the one an interrupted run recorded (`--resume`; an interrupted stage
    continues in its own run), or a finished one with the same key (the stage cache).

    `cache_cfg` is the experiment when the cache is on (its stages' `cache:` switches), else None.
    """

    def __init__(self, tracker: Tracker, parent: RunLogger, progress: Progress, resume: InterruptedRun | None,
                 cache_cfg: ExperimentConfig | None = None):
        self.tracker, self.parent, self.progress, self.resume = tracker, parent, progress, resume
        self.cache_cfg = cache_cfg
        self.run_ids: dict[str, str] = {}  # stage -> the run that produced its output (lineage)
        if resume:
            # Runs the killed driver left RUNNING that no stage will continue (candidates, ...):
            # the stages that continue are those whose outputs are recorded, the cached ones.
            continued = {resume.unfinished_run(name) for name in stage_cache.CACHED_STAGES}
            tracker.end_runs([r for r in resume.running if r not in continued], "KILLED")

    def run(self, name: str, params: dict, work: Callable[[RunLogger], object], total_steps: int | None = None,
            key: str = ""):
        recorded = self.resume.finished_output(name) if self.resume else None
        if recorded is not None:
            self.progress.say(f"    reused: finished in the interrupted run ({self.resume.stages[name].run_id})")
            self.run_ids[name] = self.resume.stages[name].run_id
            return from_json(recorded)
        reopen = self.resume.unfinished_run(name) if self.resume else None
        if reopen:
            self.progress.say(f"    continuing run {reopen}")
        elif self.cache_cfg is not None and stage_cache.cache_enabled(name, self.cache_cfg):
            cached = self._cached(name, params, key)
            if cached is not None:
                return cached
        with self.tracker.run(name, self.parent, stage=name, params=params, reopen=reopen) as log:
            log.set_tags({CACHE_KEY_TAG: key})
            self.run_ids[name] = log.run_id
            result = self.progress.during(lambda: work(log), log, total_steps)
            log.record_output(to_json(result))
        return result

    def _cached(self, name: str, params: dict, key: str):
        """The newest output recorded under `key` whose files are all still there, or None."""
        for hit in cached_outputs(self.tracker, name, key):
            record = from_json(hit.output)
            if not stage_cache.output_complete(record):
                continue  # its files were deleted or cut short: look further back, else recompute
            # A run of its own, so the MLflow tree shows every stage, linked to the run that did the work.
            with self.tracker.run(name, self.parent, stage=name, params=params) as log:
                # The note is the run's description in the MLflow UI; the link opens the producing run.
                note = (f"Cached: the output of run [{hit.run_id}](#/experiments/{self.tracker.experiment_id}/runs/"
                        f"{hit.run_id}) (stage key `{key}`).")
                log.set_tags({CACHE_KEY_TAG: key, CACHED_FROM_TAG: hit.run_id, "mlflow.note.content": note})
                log.record_output(hit.output)
            self.run_ids[name] = hit.run_id
            self.progress.say(f"    cached: reusing the output of run {hit.run_id} (stage key {key[:12]})")
            return record
        return None

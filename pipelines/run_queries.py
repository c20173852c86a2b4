"""What `gptforge run --resume` and the stage cache look up in MLflow: earlier runs and their outputs.

A pipeline run is a parent run; each stage is a child run tagged with its stage name
(STAGE_TAG) that records its output (OUTPUT_TAG) when it finishes, and its cache key
(CACHE_KEY_TAG).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.tracking import (CACHE_KEY_TAG, CACHED_FROM_TAG, OUTPUT_TAG, PARENT_TAG, STAGE_TAG, Tracker,
                                mlflow_client, redact, tracking_call)


@dataclass(frozen=True)
class StageRun:
    """The newest run of one stage of a pipeline run (or a cached output's producing run)."""

    run_id: str
    status: str  # FINISHED, RUNNING (its driver was killed), KILLED, FAILED
    output: str | None  # the recorded output (JSON) of a finished stage


@dataclass(frozen=True)
class InterruptedRun:
    """A pipeline run that did not finish: what `gptforge run --resume` continues."""

    run_id: str
    experiment_yaml: str  # the resolved config it ran with
    stages: dict  # stage name -> StageRun (the newest run of each stage)
    running: tuple = ()  # ids of child runs still marked RUNNING (their driver was killed)

    def finished_output(self, stage: str) -> str | None:
        run = self.stages.get(stage)
        return run.output if run is not None and run.status == "FINISHED" else None

    def unfinished_run(self, stage: str) -> str | None:
        """The run of `stage` that was interrupted, to continue rather than start again."""
        run = self.stages.get(stage)
        return run.run_id if run is not None and run.status != "FINISHED" else None


def interrupted_pipeline(tracker: Tracker, run_id: str | None = None) -> InterruptedRun:
    """The pipeline run to resume: `run_id`, or the newest one of `tracker`'s experiment that did not finish.

    Raises:
        LookupError: no such run, or it finished (nothing to resume).
    """
    from mlflow.exceptions import MlflowException

    if run_id is None:
        runs = list_runs(tracker.tracking_uri, tracker.experiment_name, max_results=1000)
        unfinished = [r for r in runs if r.info.status != "FINISHED"]
        if not unfinished:
            raise LookupError(f"no interrupted run of experiment {tracker.experiment_name!r} in "
                              f"{redact(tracker.tracking_uri)} to resume; start one with `gptforge run`")
        parent = unfinished[0]
    else:
        try:
            with tracking_call(tracker.tracking_uri, f"reading run {run_id}"):
                parent = tracker.client.get_run(run_id)
        except MlflowException:  # only "does not exist" gets past tracking_call
            raise LookupError(f"no run {run_id} in {redact(tracker.tracking_uri)}") from None
        if parent.data.tags.get(PARENT_TAG) or parent.info.experiment_id != tracker.experiment_id:
            raise LookupError(f"run {run_id} is not a pipeline run of experiment {tracker.experiment_name!r}")
        if parent.info.status == "FINISHED":
            raise LookupError(f"run {run_id} finished; there is nothing to resume")
    children = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'", max_results=1000)
    stages = {}
    running = tuple(c.info.run_id for c in children if c.info.status == "RUNNING")
    for child in sorted(children, key=lambda r: r.info.start_time):  # the newest run of a stage wins
        stage = child.data.tags.get(STAGE_TAG)
        if stage:
            stages[stage] = StageRun(child.info.run_id, child.info.status, child.data.tags.get(OUTPUT_TAG))
    yaml_text = tracker.client.download_artifacts(parent.info.run_id, "experiment.yaml")
    return InterruptedRun(parent.info.run_id, Path(yaml_text).read_text(), stages, running)


def cached_outputs(tracker: Tracker, stage: str, key: str) -> list[StageRun]:
    """Finished runs of `stage` in `tracker`'s experiment recorded under cache `key`, newest first.

    `StageRun.run_id` is the run that computed the output (a run that itself reused
    it points there with CACHED_FROM_TAG).
    """
    with tracking_call(tracker.tracking_uri, f"looking up cached {stage} outputs"):
        runs = tracker.client.search_runs(
            [tracker.experiment_id],
            filter_string=(f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{CACHE_KEY_TAG}` = '{key}' "
                           f"and attributes.status = 'FINISHED'"),
            order_by=["attributes.start_time DESC"], max_results=20)
    return [StageRun(r.data.tags.get(CACHED_FROM_TAG, r.info.run_id), r.info.status, r.data.tags[OUTPUT_TAG])
            for r in runs if OUTPUT_TAG in r.data.tags]


def list_runs(tracking_uri: str, experiment_name: str, max_results: int = 20) -> list:
    """Recent top-level pipeline runs of an experiment, newest first."""
    with tracking_call(tracking_uri, f"listing the runs of {experiment_name!r}"):
        client = mlflow_client(tracking_uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is None:
            return []
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                  max_results=1000)
    return [r for r in runs if PARENT_TAG not in r.data.tags][:max_results]

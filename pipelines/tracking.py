"""Every MLflow call of gptforge: runs, params, metrics, artifacts, the registry, aliases.

The driver creates the database, the experiment and every run (NOTES.md: three
processes creating a fresh SQLite store at once fail). Ray tasks and rank 0 of
Ray Train get a `RunLogger`, a picklable handle (tracking URI + run id) that
logs with explicit run ids and never touches MLflow's global "active run".
"""
from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "gptforge.stage"
# MLflow 3.17's UI opens an experiment without this tag on its GenAI traces overview (empty
# here); "custom_model_development" opens it on its runs, where the candidates are compared.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
CHAMPION = "champion"
PREVIOUS = "previous"

# MLflow logs database migrations at INFO and draws progress bars for artifact
# downloads; neither helps someone watching a pipeline run.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Against a server, MLflow prints a "View run ... at" link for every run it ends;
# gptforge prints the parent run's link once instead.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _client(tracking_uri: str):
    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_tracking_uri(workdir: str) -> str:
    """`MLFLOW_TRACKING_URI` when set, otherwise a SQLite file in `workdir`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


@dataclass(frozen=True)
class RunLogger:
    """Logs to one existing run; safe to send to a Ray task or worker."""

    tracking_uri: str
    run_id: str

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        _client(self.tracking_uri).log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters; a list of variants is far below it.
        batch = [Param(k, str(v)) for k, v in params.items()]
        client = _client(self.tracking_uri)
        for start in range(0, len(batch), 100):  # log_batch takes at most 100 params per call
            client.log_batch(self.run_id, params=batch[start : start + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        _client(self.tracking_uri).log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        _client(self.tracking_uri).log_artifacts(self.run_id, local_dir, artifact_path)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        _client(self.tracking_uri).log_artifact(self.run_id, local_path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        _client(self.tracking_uri).log_text(self.run_id, text, artifact_file)

    def log_dict(self, data, artifact_file: str) -> None:
        _client(self.tracking_uri).log_dict(self.run_id, data, artifact_file)

    def latest_metrics(self) -> dict:
        """The newest value of every metric of the run."""
        return self.snapshot()[0]

    def snapshot(self) -> tuple[dict, dict]:
        """(metrics, tags) of the run as they are now; the CLI shows progress from them."""
        data = _client(self.tracking_uri).get_run(self.run_id).data
        return dict(data.metrics), dict(data.tags)


class Tracker:
    """The driver's side: experiment set-up, the run tree, and the model registry."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self.client = _client(tracking_uri)
        self._open: list[str] = []  # ids of runs created here and not yet ended, oldest first
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            # An explicit location keeps artifacts beside the SQLite file instead of ./mlruns
            # under whatever folder the user ran from. A server chooses its own.
            location = None
            if artifact_location and tracking_uri.startswith("sqlite:"):
                location = Path(artifact_location).resolve().as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment_name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            self.experiment_id = experiment.experiment_id
            if EXPERIMENT_KIND_TAG not in experiment.tags:  # experiments made before the tag existed
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)

    def open_run(self, name: str, parent: RunLogger | None = None, stage: str | None = None,
                 params: dict | None = None) -> RunLogger:
        """Create a run, with `params` logged, that stays open until `close_run` (or an enclosing `run` fails)."""
        tags = {"mlflow.runName": name}
        if parent is not None:
            tags[PARENT_TAG] = parent.run_id
        if stage is not None:
            tags[STAGE_TAG] = stage
        commit = _git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        self._open.append(run.info.run_id)
        logger = RunLogger(self.tracking_uri, run.info.run_id)
        if params:
            logger.log_params(params)
        return logger

    def close_run(self, logger: RunLogger, status: str = "FINISHED") -> None:
        if logger.run_id in self._open:
            self._open.remove(logger.run_id)
            self.client.set_terminated(logger.run_id, status)

    @contextlib.contextmanager
    def run(self, name: str, parent: RunLogger | None = None, stage: str | None = None, params: dict | None = None):
        """A run that always ends: FINISHED, FAILED, or KILLED on Ctrl-C.

        A failure also ends, with the same status, every run opened inside this
        one and still open (candidate runs span several stages), so no run is
        left RUNNING after a crash.
        """
        logger = self.open_run(name, parent, stage, params)
        try:
            yield logger
        except BaseException as error:
            status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
            first = self._open.index(logger.run_id)
            for run_id in reversed(self._open[first:]):
                self.close_run(RunLogger(self.tracking_uri, run_id), status)
            raise
        self.close_run(logger)

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI, when tracking goes to a server."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    # ---------------------------------------------------------------- registry

    def register(self, model_name: str, run_id: str, artifact_path: str, tags: dict) -> str:
        """Register the folder `artifact_path` of `run_id` as a new version; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(model_name)
        except MlflowException:
            self.client.create_registered_model(model_name, description="gptforge champion/challenger line")
        version = self.client.create_model_version(
            model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
        )
        return version.version

    def alias_version(self, model_name: str, alias: str):
        """The model version an alias points at, or None."""
        try:
            return find_alias(self.tracking_uri, model_name, alias)
        except LookupError:
            return None

    def move_champion(self, model_name: str, version: str) -> None:
        """Point `champion` at `version`; the old champion becomes `previous` (for rollback)."""
        old = self.alias_version(model_name, CHAMPION)
        if old is not None and old.version != version:
            self.client.set_registered_model_alias(model_name, PREVIOUS, old.version)
        self.client.set_registered_model_alias(model_name, CHAMPION, version)

    def run_metrics(self, run_id: str) -> dict:
        return dict(self.client.get_run(run_id).data.metrics)


def find_alias(tracking_uri: str, model_name: str, alias: str = CHAMPION):
    """The model version `alias` points at.

    Raises:
        LookupError: the model or alias does not exist (nothing promoted yet).
    """
    from mlflow.exceptions import MlflowException

    try:
        return _client(tracking_uri).get_model_version_by_alias(model_name, alias)
    except MlflowException:
        raise LookupError(
            f"no model version with alias {alias!r} for registered model {model_name!r} in {tracking_uri}; "
            f"run `gptforge run` first (or check MLFLOW_TRACKING_URI and the experiment name)"
        ) from None


def download_version(tracking_uri: str, version, dst_dir: str) -> str:
    """Download the files of a model version (from `find_alias`) under `dst_dir`; returns their folder."""
    import mlflow.artifacts

    return mlflow.artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=tracking_uri, dst_path=dst_dir)


def list_runs(tracking_uri: str, experiment_name: str, max_results: int = 20) -> list:
    """Recent top-level pipeline runs of an experiment, newest first."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1000)
    return [r for r in runs if PARENT_TAG not in r.data.tags][:max_results]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None

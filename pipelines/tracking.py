"""MLflow runs of gptforge: the experiment, the run tree, and logging to a run.

Every MLflow call of gptforge goes through this module and those beside it:
`pipelines/run_queries.py` (what `--resume` and the stage cache look up),
`pipelines/registry.py` (model versions and their aliases) and
`pipelines/metrics_buffer.py` (a training worker's metrics, sent in batches).

The driver creates the database, the experiment and every run before any Ray task
or worker touches them: processes that create a fresh SQLite store at the same time
fail in its schema migrations, while once it exists several processes can log to it
at once (docs/ray-and-mlflow.md). Ray tasks and rank 0 of Ray Train get a `RunLogger`, a
picklable handle (tracking URI + run id) that logs with explicit run ids and never
touches MLflow's global "active run".
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from components.experiment_file import ExperimentConfig

PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "gptforge.stage"
OUTPUT_TAG = "gptforge.output"  # a finished stage's output record (JSON), what --resume reuses
PROGRESS_TAG = "gptforge.progress"  # a stage's latest progress message, which the CLI prints
CACHE_KEY_TAG = "gptforge.cache_key"  # a stage run's cache key (pipelines/stage_cache.py)
CACHED_FROM_TAG = "gptforge.cached_from"  # on a stage run that reused an output: the run that produced it
# MLflow 3.17's UI opens an experiment without this tag on its GenAI traces overview (empty
# here); "custom_model_development" opens it on its runs, where the candidates are compared.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingError(RuntimeError):
    """The tracking server or model registry did not answer; nothing was changed by the failed call."""


_SCHEME = r"\b[A-Za-z][A-Za-z0-9+.-]*://"
# Where a secret ends: at the "@" after which only the host (and port) comes before a path, query or blank.
# The secret itself may hold any character but a blank, "/" and "@" included, which people do write unescaped.
_BEFORE_HOST = r"@(?=[^\s/?#@]*(?:[\s/?#]|$))"
_URI_PASSWORD = re.compile(rf"(?P<start>{_SCHEME}[^:/?#@\s]*):(?P<secret>\S*?){_BEFORE_HOST}")
_URI_TOKEN = re.compile(rf"(?P<start>{_SCHEME})[^:/?#@\s]+@")  # a user part alone is often a token
# `user:pw@host` without a scheme (a Ray or database address); a "/" after the colon is a URI's path
# (`models:/name@alias`, `s3://...`), not a password.
_BARE_PASSWORD = re.compile(rf"(?<![\w/:@.%+~-])(?P<start>[\w.~%+-]+):(?!/)(?P<secret>\S+?){_BEFORE_HOST}")
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;#][^=&;#?\s]*(?:token|pass|pwd|secret|key|sig|credential|auth|session)[^=&;#?\s]*=)[^&;#\s]*",
    re.IGNORECASE)


def redact(text) -> str:
    """`text` with the secrets of every address in it replaced by `***`: for anything printed, logged or stored.

    `http://user:pw@host` -> `http://user:***@host` (also with "/" or "@" in the password, and
    without a scheme: `user:pw@host:6379`); a user part alone (often a token) -> `***@host`;
    query and fragment values of keys such as token, access_token, password, pass, pwd,
    secret, key, api_key, signature, X-Amz-Signature, X-Amz-Credential -> `***`.
    """
    text = _URI_PASSWORD.sub(r"\g<start>:***@", str(text))
    text = _URI_TOKEN.sub(r"\g<start>***@", text)
    text = _BARE_PASSWORD.sub(r"\g<start>:***@", text)
    return _SECRET_QUERY.sub(r"\g<key>***", text)


def is_not_found(error) -> bool:
    """An MlflowException that means "this model, version, alias or run does not exist"."""
    return getattr(error, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


@contextlib.contextmanager
def tracking_call(tracking_uri: str, what: str):
    """Turn any error but "does not exist" into a TrackingError naming the server (redacted)."""
    try:
        yield
    except LookupError:
        raise
    except Exception as error:  # noqa: BLE001 - MlflowException, or requests/SQLAlchemy errors beneath it
        if is_not_found(error):
            raise
        line = error_line(error)
        refused = any(marker in line for marker in ("401", "403", "Unauthorized", "Permission denied",
                                                       "PERMISSION_DENIED", "UNAUTHENTICATED"))
        advice = ("The server refused the credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                  "to an account allowed to do this" if refused else
                  "Check that it is running and reachable (MLFLOW_TRACKING_URI)")
        raise TrackingError(
            f"the MLflow tracking server {redact(tracking_uri)} failed while {what}: "
            f"{line}; nothing was changed in the registry. {advice}, then run again"
        ) from None


def error_line(error: BaseException, limit: int = 800) -> str:
    """The first line of an error's message with its secrets redacted: for log lines and stored details."""
    text = str(error).strip() or type(error).__name__
    return redact(text.splitlines()[0][:limit])


def configure_mlflow() -> None:
    """Quiet MLflow for someone watching a pipeline run; call before MLflow logs, ends a run or downloads.

    MLflow reads these variables when it acts, so setting them here, in the process that
    calls it (the driver, a Ray task or worker), is early enough.
    """
    # Database migrations are logged at INFO, and artifact downloads draw progress bars.
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Against a server, MLflow prints a "View run ... at" link for every run it ends;
    # gptforge prints the parent run's link once instead.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def mlflow_client(tracking_uri: str):
    """An MlflowClient for the tracking store and registry at `tracking_uri`."""
    from mlflow import MlflowClient

    configure_mlflow()
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
        mlflow_client(self.tracking_uri).log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow caps a param value at 6000 characters; a list of variants is far below it.
        batch = [Param(k, v) for k, v in _redacted(params).items()]
        client = mlflow_client(self.tracking_uri)
        for start in range(0, len(batch), 100):  # log_batch takes at most 100 params per call
            client.log_batch(self.run_id, params=batch[start : start + 100])

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        mlflow_client(self.tracking_uri).log_batch(self.run_id, tags=[RunTag(k, v) for k, v in _redacted(tags).items()])

    def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
        mlflow_client(self.tracking_uri).log_artifacts(self.run_id, local_dir, artifact_path)

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        mlflow_client(self.tracking_uri).log_artifact(self.run_id, local_path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow_client(self.tracking_uri).log_text(self.run_id, text, artifact_file)

    def log_dict(self, data, artifact_file: str) -> None:
        mlflow_client(self.tracking_uri).log_dict(self.run_id, data, artifact_file)

    def record_output(self, record_json: str) -> None:
        """Keep the stage's output record (`components.artifacts.to_json`) on its run for --resume."""
        self.set_tags({OUTPUT_TAG: record_json})

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """Every (step, value) logged for `key`, in step order."""
        history = mlflow_client(self.tracking_uri).get_metric_history(self.run_id, key)
        return sorted((m.step, m.value) for m in history)

    def latest_metrics(self) -> dict:
        """The newest value of every metric of the run."""
        return self.snapshot()[0]

    def snapshot(self) -> tuple[dict, dict]:
        """(metrics, tags) of the run as they are now; the CLI shows progress from them."""
        data = mlflow_client(self.tracking_uri).get_run(self.run_id).data
        return dict(data.metrics), dict(data.tags)


class Tracker:
    """The driver's side: the experiment and its run tree."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None):
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self._open: list[str] = []  # ids of runs created here and not yet ended, oldest first
        with tracking_call(tracking_uri, f"opening experiment {experiment_name!r}"):
            self.client = mlflow_client(tracking_uri)
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

    @classmethod
    def for_experiment(cls, cfg: ExperimentConfig) -> Tracker:
        """The tracker of experiment `cfg`: its store (`resolve_tracking_uri`), named `cfg.name`.

        Artifacts of a SQLite store go to `workdir/mlartifacts`.
        """
        workdir = Path(cfg.workdir).resolve()
        return cls(resolve_tracking_uri(cfg.workdir), cfg.name, artifact_location=str(workdir / "mlartifacts"))

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
        with tracking_call(self.tracking_uri, f"creating run {name!r}"):
            run = self.client.create_run(self.experiment_id, tags=_redacted(tags), run_name=redact(name))
        self._open.append(run.info.run_id)
        logger = RunLogger(self.tracking_uri, run.info.run_id)
        if params:
            try:
                with tracking_call(self.tracking_uri, f"logging the params of run {name!r}"):
                    logger.log_params(params)
            except BaseException as error:  # the run exists: end it rather than leave it RUNNING
                self._end_quietly(run.info.run_id, _failed_status(error))
                raise
        return logger

    def close_run(self, logger: RunLogger, status: str = "FINISHED") -> None:
        if logger.run_id in self._open:
            self._open.remove(logger.run_id)
            with tracking_call(self.tracking_uri, f"ending run {logger.run_id}"):
                self.client.set_terminated(logger.run_id, status)

    def reopen_run(self, run_id: str) -> RunLogger:
        """Mark an interrupted run RUNNING again (for --resume); it stays open until `close_run`."""
        with tracking_call(self.tracking_uri, f"reopening run {run_id}"):
            self.client.update_run(run_id, status="RUNNING")
        self._open.append(run_id)
        return RunLogger(self.tracking_uri, run_id)

    @contextlib.contextmanager
    def run(self, name: str, parent: RunLogger | None = None, stage: str | None = None, params: dict | None = None,
            reopen: str | None = None):
        """A run that always ends: FINISHED, FAILED, or KILLED on Ctrl-C.

        With `reopen`, that existing run continues instead of a new one being created.
        A failure (logging the params included) also ends, with the same status, every
        run opened inside this one and still open (candidate runs span several stages),
        so no run is left RUNNING after a crash. Ending them never replaces the error.
        """
        before = set(self._open)
        logger = self.reopen_run(reopen) if reopen else self.open_run(name, parent, stage, params)
        try:
            yield logger
        except BaseException as error:
            status = _failed_status(error)
            for run_id in [r for r in reversed(self._open) if r not in before]:  # newest first, this run last
                self._end_quietly(run_id, status)
            raise
        self.close_run(logger)

    def _end_quietly(self, run_id: str, status: str) -> None:
        """End a run while an error is on its way up: a failure here is logged, never raised over it."""
        try:
            self.close_run(RunLogger(self.tracking_uri, run_id), status)
        except Exception as close_error:  # noqa: BLE001 - the server may be what failed; keep the cause
            logging.getLogger(__name__).warning("could not mark run %s %s: %s", run_id, status,
                                                error_line(close_error))

    def end_runs(self, run_ids, status: str) -> None:
        """Mark runs that no process will continue (status KILLED, FAILED, ...)."""
        for run_id in run_ids:
            self.client.set_terminated(run_id, status)

    def run_url(self, run_id: str) -> str | None:
        """The run's page in the MLflow UI, when tracking goes to a server."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        return redact(f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}")

    def run_tags(self, run_id: str) -> dict:
        with tracking_call(self.tracking_uri, f"reading run {run_id}"):
            return dict(self.client.get_run(run_id).data.tags)

    def run_metrics(self, run_id: str) -> dict:
        with tracking_call(self.tracking_uri, f"reading run {run_id}"):
            return dict(self.client.get_run(run_id).data.metrics)

    def experiment_tags(self) -> dict:
        with tracking_call(self.tracking_uri, f"reading experiment {self.experiment_name!r}"):
            return dict(self.client.get_experiment(self.experiment_id).tags)

    def set_experiment_tags(self, tags: dict) -> None:
        with tracking_call(self.tracking_uri, f"tagging experiment {self.experiment_name!r}"):
            for key, value in _redacted(tags).items():
                self.client.set_experiment_tag(self.experiment_id, key, value)


def _failed_status(error: BaseException) -> str:
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def _redacted(mapping: dict) -> dict:
    """Values as MLflow shows them to anyone who can read the run: no address's secret among them."""
    return {k: redact(v) for k, v in mapping.items()}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None

"""Tracking when the store fails: no metrics lost to a failed send, no error hidden behind a metrics
error, no run left RUNNING, and no address's secret in what MLflow keeps.

Real stores only: a SQLite file, a real `mlflow server`, and an address where nothing listens
(MLflow's client then fails as it does against a server that went away).
"""
import logging

import pytest
from mlflow import MlflowClient

from pipelines.metrics_buffer import MetricsBuffer
from pipelines.tracking import PROGRESS_TAG, RunLogger, Tracker, TrackingError
from tests.helpers import MlflowServer, free_port

SECRET = "s3cret-9f3k"


@pytest.fixture(autouse=True)
def _one_try(monkeypatch):
    # MLflow retries a refused connection 7 times with exponential backoff (minutes); one try is enough here.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _nobody() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def _log_steps(buffer: MetricsBuffer, steps) -> None:
    for step in steps:
        buffer.log({"train/loss": 10.0 - step, "train/lr": 1e-3}, step)


# ------------------------------------------------------------ MetricsBuffer


@pytest.mark.integration
def test_steps_a_failed_send_kept_reach_mlflow_once_the_server_answers(tmp_path):
    port = free_port()
    store = f"sqlite:///{tmp_path / 'server.db'}"  # the database the server will serve
    client = MlflowClient(store)
    run_id = client.create_run(client.create_experiment("tiny")).info.run_id
    buffer = MetricsBuffer(RunLogger(f"http://127.0.0.1:{port}", run_id), interval_s=3600)
    _log_steps(buffer, range(5))
    with pytest.raises(Exception):  # noqa: B017 - whatever MLflow's client raises for a refused connection
        buffer.flush()  # the server is down
    assert buffer.pending == 5  # none dropped: 0 of 5 reached MLflow before
    server = MlflowServer(tmp_path, port=port)  # back, on the same address
    try:
        buffer.close()
    finally:
        server.stop()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [
        (0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0)]
    assert buffer.pending == 0 and buffer.dropped == 0


def test_the_buffer_drops_the_oldest_steps_only_past_its_bound_and_says_how_many(caplog):
    buffer = MetricsBuffer(RunLogger(_nobody(), "0" * 32), interval_s=3600, max_pending=3)
    caplog.set_level(logging.WARNING, logger="pipelines.metrics_buffer")
    _log_steps(buffer, range(2))
    with pytest.raises(Exception):  # noqa: B017
        buffer.flush()
    assert buffer.pending == 2 and "dropped" not in caplog.text  # within the bound: kept, nothing said
    _log_steps(buffer, range(2, 5))
    with pytest.raises(Exception):  # noqa: B017
        buffer.flush()
    assert buffer.pending == 3 and buffer.dropped == 2
    assert "dropped the oldest 2" in caplog.text
    assert [step for step, _, _ in buffer._pending] == [2, 3, 4]  # the newest kept
    with pytest.raises(Exception):  # noqa: B017
        buffer.close()


def test_a_metrics_error_never_hides_the_training_error(caplog):
    caplog.set_level(logging.WARNING, logger="pipelines.metrics_buffer")
    with pytest.raises(RuntimeError, match="training diverged"):
        with MetricsBuffer(RunLogger(_nobody(), "0" * 32), interval_s=3600) as buffer:
            _log_steps(buffer, range(3))
            raise RuntimeError("training diverged")
    assert "could not send the last 3 steps of metrics" in caplog.text
    with pytest.raises(Exception) as info:  # noqa: B017 - training succeeded: the lost metrics are the error
        with MetricsBuffer(RunLogger(_nobody(), "0" * 32), interval_s=3600) as buffer:
            _log_steps(buffer, range(3))
    assert "training diverged" not in str(info.value)


# ------------------------------------------------------------ Tracker: no run left RUNNING


def _statuses(tracker: Tracker) -> dict:
    return {r.info.run_name: r.info.status for r in tracker.client.search_runs([tracker.experiment_id])}


def test_a_run_whose_params_are_refused_is_ended_not_left_running(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny")
    with pytest.raises(TrackingError, match="logging the params of run 'tiny-pipeline'.*Names may only contain"):
        with tracker.run("tiny-pipeline", params={"bad*key": 1}):
            pass
    with pytest.raises(TrackingError):
        with tracker.run("parent") as parent:
            tracker.open_run("child", parent, stage="pretrain", params={"bad*key": 1})
    assert _statuses(tracker) == {"tiny-pipeline": "FAILED", "parent": "FAILED", "child": "FAILED"}


def test_an_error_is_not_replaced_when_the_run_was_ended_inside(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny")
    with pytest.raises(KeyError, match="the training error"):
        with tracker.run("parent") as parent:
            child = tracker.open_run("candidate", parent)
            tracker.close_run(parent, "FAILED")
            raise KeyError("the training error")
    assert _statuses(tracker) == {"parent": "FAILED", "candidate": "FAILED"}
    assert tracker.client.get_run(child.run_id).info.status == "FAILED"


# ------------------------------------------------------------ no secret in MLflow


def test_params_tags_and_run_names_keep_no_address_secret(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tiny")
    with tracker.run(f"from s3://AKIA:{SECRET}@bucket", params={"data.source": f"s3://AKIA:{SECRET}@bucket/docs",
                                                              "data.max_bytes": 0}) as log:
        log.set_tags({PROGRESS_TAG: f"reading https://user:{SECRET}@host/data?token={SECRET}"})
    run = tracker.client.get_run(log.run_id)
    kept = [run.info.run_name, *run.data.params.values(), *run.data.tags.values()]
    assert not any(SECRET in str(value) for value in kept), kept
    assert run.data.params["data.source"] == "s3://AKIA:***@bucket/docs"
    assert run.data.params["data.max_bytes"] == "0"

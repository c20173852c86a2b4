"""A training worker's metrics, buffered and sent to MLflow in batches, none lost to a failed send.

Part of the tracking module family (`pipelines/tracking.py`): it logs to a run through
the same client, with explicit run ids.
"""
from __future__ import annotations

import logging
import threading
import time

from pipelines.tracking import RunLogger, error_line, mlflow_client


class MetricsBuffer:
    """A training worker's metrics, sent to MLflow in batches from a background thread.

    Logging a step then costs the training loop a list append, not a database write
    (tens of milliseconds, more than a whole GPU step). `latest` holds the newest values.
    Steps MLflow did not take stay for the next flush; past `max_pending` steps the oldest
    are dropped (counted in `dropped`), and only then does the log say steps were lost.

    Used as `with buffer:` it closes when the block ends; an error sending the last steps
    is raised only when the block succeeded, so it never hides the block's own error.
    """

    def __init__(self, logger: RunLogger, interval_s: float = 1.0, max_pending: int = 10_000):
        self.logger = logger
        self.max_pending = max_pending
        self.latest: dict = {}
        self.dropped = 0
        self._pending: list = []  # (step, timestamp in ms, {key: value}), oldest first
        self._lock = threading.Lock()  # guards _pending
        self._sending = threading.Lock()  # one flush at a time keeps the steps in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="gptforge-metrics", daemon=True)
        self._thread.start()

    def log(self, metrics: dict, step: int) -> None:
        self.latest = dict(metrics)
        with self._lock:
            self._pending.append((step, int(time.time() * 1000), dict(metrics)))

    @property
    def pending(self) -> int:
        """Steps logged and not yet in MLflow."""
        with self._lock:
            return len(self._pending)

    def flush(self) -> None:
        """Send everything logged so far; returns when MLflow has it.

        Raises:
            the store's error; the steps it did not take are kept for the next flush.
        """
        from mlflow.entities import Metric

        with self._sending:
            with self._lock:
                unsent, self._pending = self._pending, []
            try:
                client = mlflow_client(self.logger.tracking_uri)
                while unsent:
                    count, size = 1, len(unsent[0][2])  # log_batch takes at most 1000 metrics per call
                    while count < len(unsent) and size + len(unsent[count][2]) <= 1000:
                        size, count = size + len(unsent[count][2]), count + 1
                    client.log_batch(self.logger.run_id, metrics=[
                        Metric(k, float(v), ms, step) for step, ms, values in unsent[:count] for k, v in values.items()])
                    unsent = unsent[count:]
            finally:
                if unsent:
                    self._keep(unsent)

    def close(self) -> None:
        """Stop the background thread and send what is left.

        Raises:
            the store's error when the last steps could not be sent.
        """
        self._stop.set()
        self._thread.join()
        self.flush()

    def __enter__(self) -> MetricsBuffer:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        try:
            self.close()
        except Exception as close_error:  # noqa: BLE001 - raised below unless the block failed first
            if error_type is None:
                raise
            logging.getLogger(__name__).warning("could not send the last %d steps of metrics to MLflow: %s",
                                                self.pending, error_line(close_error))

    def _keep(self, unsent: list) -> None:
        with self._lock:
            self._pending = unsent + self._pending
            over = len(self._pending) - self.max_pending
            if over > 0:
                del self._pending[:over]
                self.dropped += over
        if over > 0:
            logging.getLogger(__name__).warning(
                "MLflow has not taken the metrics of %d steps; dropped the oldest %d (%d dropped so far), "
                "keeping the newest %d for the next try", len(unsent), over, self.dropped, self.max_pending)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.flush()
            except Exception as error:  # noqa: BLE001 - a busy store must not kill training
                logging.getLogger(__name__).warning("could not send %d steps of metrics to MLflow; kept for the "
                                                    "next try: %s", self.pending, error_line(error))


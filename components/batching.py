"""The endpoint's batching loop: requests queue up, one thread runs them in batches.

Pure Python (no Ray, no HTTP). A request is a `Work` of one or more rows (prompts x n).
The loop waits up to `serve.batch_wait_timeout_s` after the first queued work for more
(only when the previous batch had company: a lone client does not pay the wait), then
runs the oldest works whose rows fit together (`fits`, at most `serve.max_batch_size`
rows, all for the same model), so concurrent requests share one forward pass per token.
A request that would push the queue past `serve.max_queued_rows` is refused at once (`Overloaded`),
so an overloaded endpoint answers 503 instead of letting connections hang.
The run function reports a request that fails on its own to that request alone (`generate_batch`
does, through `Row.fail`); what it raises is not any one request's fault and fails the whole batch.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from components.config import ServeConfig


class Overloaded(RuntimeError):
    """The queue is full; the client should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Work:
    """One request's rows, with the model it was tokenized for and who to tell about a failure."""

    rows: list
    model: object
    fail: Callable[[BaseException], None]
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # when its batch began (time.monotonic), for the Server-Timing header


class Batcher:
    """Runs `run(model, works)` on a background thread, in batches of concurrent works."""

    def __init__(self, run: Callable[[object, list[Work]], None], cfg: ServeConfig,
                 fits: Callable[[object, list], bool]):
        """`cfg` is the experiment's `serve:` section: `max_batch_size` rows at most per batch, a wait
        of `batch_wait_timeout_s` for company, `max_queued_rows` rows at most in the queue."""
        self._run, self._fits = run, fits
        self.max_batch_rows, self.wait_s = cfg.max_batch_size, cfg.batch_wait_timeout_s
        self.max_queued_rows = cfg.max_queued_rows
        self._queue: collections.deque[Work] = collections.deque()
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._stopped = False
        self._last_batch_rows = 0
        self._thread = threading.Thread(target=self._loop, name="gptforge-batcher", daemon=True)
        self._thread.start()

    def submit(self, work: Work) -> None:
        """Queue `work`. Raises Overloaded when the queue is full (the work is not queued)."""
        with self._cond:
            if self._queued_rows + len(work.rows) > self.max_queued_rows:
                raise Overloaded(f"the endpoint is busy: {self._queued_rows} completions already queued "
                                 f"(serve.max_queued_rows={self.max_queued_rows}); retry shortly", retry_after_s=1)
            self._queue.append(work)
            self._queued_rows += len(work.rows)
            self._cond.notify()

    def queued_rows(self) -> int:
        with self._cond:
            return self._queued_rows

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _next_batch(self) -> tuple[object, list[Work]] | None:
        with self._cond:
            while not self._queue and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return None
            wait_s = self.wait_s if self._last_batch_rows > 1 else 0.0
            deadline = self._queue[0].queued_at + wait_s
            while self._queued_rows < self.max_batch_rows and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            model = self._queue[0].model
            batch, rows, kept = [], [], collections.deque()
            while self._queue:
                work = self._queue.popleft()
                joined = rows + work.rows
                # The first work always goes (a single request never exceeds the limits: the endpoint checks).
                if not batch or (work.model is model and len(joined) <= self.max_batch_rows
                                 and self._fits(model, joined)):
                    batch.append(work)
                    rows = joined
                else:
                    kept.append(work)
            self._queue = kept
            self._queued_rows -= len(rows)
            started = time.monotonic()
            for work in batch:
                work.started_at = started
            self._last_batch_rows = len(rows)
            return model, batch

    def _loop(self) -> None:
        while True:
            taken = self._next_batch()
            if taken is None:
                return
            model, batch = taken
            try:
                self._run(model, batch)
            except BaseException as error:  # noqa: BLE001 - a failed batch fails its requests, not the loop
                logging.getLogger(__name__).exception("a batch of %d requests failed", len(batch))
                for work in batch:
                    try:
                        work.fail(error)
                    except Exception:  # noqa: BLE001 - one request's listener must not stop the loop
                        logging.getLogger(__name__).exception("could not report a failed batch")

"""What the person running the pipeline sees: one line per stage event, no Ray log noise.

Stages run in other processes, so their progress travels through what they
log to MLflow anyway: training steps as metrics, other stages as a
`gptforge.progress` tag. `Progress.watch(logger)` returns a function that the
driver calls about once a second to print anything new.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

from pipelines.tracking import PROGRESS_TAG, RunLogger


class Progress:
    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._stage_start = time.perf_counter()

    def say(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def stage(self, name: str) -> None:
        """Announce a stage; `done` later prints how long it took."""
        self._stage_start = time.perf_counter()
        self.say(f"==> {name}")

    def done(self, summary: str = "") -> None:
        took = time.perf_counter() - self._stage_start
        self.say(f"    done in {took:.1f}s{'  ' + summary if summary else ''}")

    def watch(self, logger: RunLogger, total_steps: int | None = None) -> Callable[[], None]:
        """A poller printing the run's new progress messages and training steps."""
        seen = {"step": 0, "message": None}

        def poll() -> None:
            try:
                metrics, tags = logger.snapshot()
            except Exception:  # a busy SQLite file must not kill the run; try again next tick
                return
            message = tags.get(PROGRESS_TAG)
            if message and message != seen["message"]:
                seen["message"] = message
                self.say(f"    {message}")
            step = int(metrics.get("train/step", 0))
            # About twenty lines per training stage, whatever log_every is, plus the last step.
            stride = max(1, (total_steps or 0) // 20)
            if step > seen["step"] and (step - seen["step"] >= stride or step == total_steps):
                seen["step"] = step
                of = f"/{total_steps}" if total_steps else ""
                extra = ""
                if "train/mfu" in metrics:
                    extra += f"  MFU {metrics['train/mfu']:.1%}"
                if "val/loss" in metrics and metrics["val/loss"] != seen.get("val"):  # only when it is new
                    seen["val"] = metrics["val/loss"]
                    extra += f"  val loss {metrics['val/loss']:.4f}"
                self.say(
                    f"    step {step:>5}{of}  loss {metrics.get('train/loss', float('nan')):.4f}"
                    f"  lr {metrics.get('train/lr', 0):.2e}  {metrics.get('train/tokens_per_s', 0):,.0f} tok/s{extra}"
                )

        return poll

    def during(self, work: Callable[[], object], logger: RunLogger, total_steps: int | None = None):
        """Run `work()` in this thread while another prints the run's progress once a second."""
        poll = self.watch(logger, total_steps)
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(1.0):
                poll()

        thread = threading.Thread(target=loop, name="gptforge-progress", daemon=True)
        thread.start()
        try:
            return work()
        finally:
            stop.set()
            thread.join()
            poll()  # the last step or message, which may have landed after the final tick

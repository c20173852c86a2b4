"""How a `gptforge` command stops: on SIGTERM (`kill`, systemd, Docker, job schedulers) as on Ctrl-C.

The signal raises KeyboardInterrupt on the main thread, so the same clean-up runs: MLflow
runs marked KILLED, Serve and Ray shut down, and any HAProxy Serve started stopped by pid.
`start_ray` / `stop_ray` bracket a command's Ray so that this holds while Ray runs too.
"""
from __future__ import annotations

import signal
import threading

# The signal that became the KeyboardInterrupt, if one did. Kept here rather than in the exception:
# a KeyboardInterrupt raised inside a Ray call comes back out of Ray as a new, plain one.
_terminated_by: list[int] = []


def handle_signals() -> None:
    """SIGTERM and SIGINT raise KeyboardInterrupt; call on the main thread before the command runs."""
    signal.signal(signal.SIGTERM, _terminate)
    # Set explicitly because a shell starting us in the background ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def terminated_by() -> int | None:
    """The signal number behind the KeyboardInterrupt being handled (None: Ctrl-C)."""
    return _terminated_by[0] if _terminated_by else None


def _terminate(signum, frame):
    # Once: a second SIGTERM (an impatient `kill`) must not cut the clean-up of the first short.
    signal.signal(signum, _already_stopping)
    _terminated_by.append(signum)
    raise KeyboardInterrupt


def _already_stopping(signum, frame):
    pass


def start_ray(num_cpus: int) -> None:
    """Ray for a command that may serve (embedded, or RAY_ADDRESS), with HAProxy's files private and SIGTERM ours.

    Call it inside the `try` whose `finally` calls `stop_ray`, so that a signal arriving
    while Ray starts still gets everything stopped.
    """
    from pipelines import ray_runtime, serving

    serving.isolate_haproxy()
    handler = signal.getsignal(signal.SIGTERM)
    ray_runtime.init_ray(num_cpus)
    # ray.init installs a SIGTERM handler of its own that kills Ray's daemons and exits at once:
    # Serve never shuts down, so what Ray's workers started (Ray's agents, HAProxy) may outlive it.
    if handler is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def stop_ray() -> None:
    """Shut Ray down (embedded: its processes end), then stop any HAProxy left from this process's Serve."""
    from pipelines import ray_runtime, serving

    try:
        ray_runtime.shutdown_ray()
    finally:
        serving.stop_haproxy()

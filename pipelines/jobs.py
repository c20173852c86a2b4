"""Ray Jobs: submit the pipeline to a Ray cluster, list, follow, and stop its jobs.

Part of the Ray module family with `ray_runtime.py`, but a module of its own: that one
runs *inside* a Ray cluster (tasks, Ray Train), this one is a client talking to a
cluster's job server over HTTP (`JobSubmissionClient`), the way `ray job` does.

A job runs `python -m pipelines.cli run EXPERIMENT ...` in a copy of this project
(`runtime_env.working_dir`), so the cluster runs the code that was submitted.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from http.client import HTTPException
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipelines.tracking import error_line, redact

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # where `ray start --head` puts the job server
# Never uploaded with the job: environments, local stores and caches (Ray also skips what .gitignore lists).
_EXCLUDES = [".venv", ".git", ".gptforge", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", "mlruns"]
_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
_FINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(RuntimeError):
    """The job server could not be reached, or refused a request; the message names the address (redacted)."""

    def __init__(self, message: str):
        super().__init__(redact(message))  # addresses may carry a password or token


@dataclass(frozen=True)
class JobInfo:
    job_id: str
    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    experiment: str
    run_name: str
    start_time: float | None  # seconds since the epoch
    entrypoint: str
    message: str


def resolve_address(address: str | None) -> str:
    """The job server's HTTP address, chosen as `ray job` chooses it, except that --address wins.

    `address`, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the local head's job
    server. An http(s) URL is used as it is; a cluster address (`auto`, `ray://HOST:10001`,
    or the GCS `HOST:6379`) is turned into its job server's URL by Ray, which asks the
    cluster (within 15 s).

    Raises:
        JobError: a cluster address that does not answer.
    """
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
               or DEFAULT_ADDRESS)
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    return _ask_ray_for_job_server(address)


@lru_cache(maxsize=None)
def _ask_ray_for_job_server(address: str) -> str:
    import time

    from ray.dashboard.utils import get_address_for_submission_client

    from pipelines.ray_runtime import off_the_main_thread

    try:
        with _ray_address_env_cleared():
            return off_the_main_thread(lambda: get_address_for_submission_client(address), time.monotonic() + 15,
                                       f"no Ray cluster answered at {address} within 15 s")
    except Exception as error:  # noqa: BLE001 - TimeoutError, ConnectionError, ValueError from Ray's lookup
        raise JobError(f"could not find the job server of the Ray cluster at {address!r}: {_reason(error)}; "
                       f"pass --address http://HOST:8265 (the dashboard's address)") from None


@contextmanager
def _ray_address_env_cleared():
    """Ray's job client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override the address it is given;
    here the address was already chosen from them (and from --address), so it must stand."""
    saved = {k: os.environ.pop(k) for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def is_local(address: str) -> bool:
    return urlparse(address).hostname in _LOCAL_HOSTS


def client(address: str | None = None, timeout_s: float = 10.0):
    """A JobSubmissionClient for `address` (see resolve_address), failing at once when nobody answers.

    Raises:
        JobError: nothing answers there, or it is not a Ray job server.
    """
    resolved = resolve_address(address)
    # The client's own connection check has no short timeout; an unroutable address would hang.
    try:
        _probe(f"{resolved}/api/version", timeout_s)
    except OSError as error:
        if getattr(error, "code", None) is None:  # an HTTP error status still means a server answered
            raise JobError(f"no Ray job server answers at {resolved} ({getattr(error, 'reason', error)}); "
                           f"start one (`ray start --head`, `ray up ray_cluster.yaml`) or pass "
                           f"--address / RAY_ADDRESS with the dashboard's address") from None
    except (ValueError, HTTPException) as error:  # InvalidURL: e.g. an unescaped "/" in a password
        raise JobError(f"--address {resolved}: not a usable URL ({error}); percent-encode any '/', '@' or ':' "
                       f"in the user name or password (%2F, %40, %3A)") from None
    from ray.job_submission import JobSubmissionClient

    try:
        with _ray_address_env_cleared():
            return JobSubmissionClient(resolved)
    except Exception as error:  # noqa: BLE001 - ConnectionError, RuntimeError: both mean "not usable"
        raise JobError(f"the Ray job server at {resolved} refused the connection: {_reason(error)}") from None


def _probe(url: str, timeout_s: float) -> None:
    """GET `url`; credentials in it (`https://user:token@host`) go as basic auth, as Ray's client sends them."""
    import base64
    import urllib.request

    parts = urlparse(url)
    headers = {}
    if parts.username is not None or parts.password is not None:
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s).close()


def pipeline_job(experiment: str | None, overrides: list[str], workdir: str, address: str,
                 tracking_uri: str | None = None) -> tuple:
    """(experiment, overrides, env) for a job running this experiment, as `gptforge run` here would.

    The experiment file travels with the project, so it must lie inside it. Without
    MLFLOW_TRACKING_URI a job on this machine's head writes to the same SQLite store and
    workdir as `gptforge run` here; a job on another machine would write into its own
    temporary copy of the project, which is lost, so that needs a tracking server.

    Args:
        tracking_uri: the MLflow server as the job sees it (default: MLFLOW_TRACKING_URI here).

    Raises:
        JobError: the experiment is outside the project, or a remote job has no tracking server.
    """
    from pipelines.tracking import resolve_tracking_uri

    if experiment is not None:
        path = Path(experiment).resolve()
        if not path.is_relative_to(PROJECT):
            raise JobError(f"experiment {experiment} is outside the project folder {PROJECT}, and only that folder "
                           f"is sent with the job; copy it under {PROJECT / 'experiments'}")
        experiment = path.relative_to(PROJECT).as_posix()
    env = {}
    tracking = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking:
        env["MLFLOW_TRACKING_URI"] = tracking
    elif not is_local(address):
        raise JobError(f"give --tracking-uri (or MLFLOW_TRACKING_URI) with the cluster's MLflow server as the job "
                       f"sees it, for example http://HEAD_PRIVATE_IP:5000, before submitting to {address}: "
                       f"without it the job's runs would land in a temporary folder on the cluster")
    if is_local(address):
        overrides = [*(o for o in overrides if not o.startswith("workdir=")), f"workdir={Path(workdir).resolve()}"]
        env.setdefault("MLFLOW_TRACKING_URI", resolve_tracking_uri(workdir))
    return experiment or "", overrides, env


def job_entrypoint(experiment: str, overrides: list[str], extra: list[str] = ()) -> str:
    """The shell command a job runs: the pipeline, from the job's copy of this project."""
    return shlex.join(["python", "-m", "pipelines.cli", "run", *([experiment] if experiment else []), *overrides,
                       *extra])


def submit(address: str | None, experiment: str, overrides: list[str], *, experiment_name: str,
           env: dict, run_name: str | None = None, submission_id: str | None = None,
           no_cache: bool = False) -> str:
    """Submit the pipeline as a Ray job; returns the job id.

    Args:
        experiment: the experiment file, relative to the project (it travels in working_dir).
        env: environment variables for the job (MLFLOW_TRACKING_URI, ...).
        submission_id: the job id to use. The job server keeps one job per id, so submitting
            again with an id it already has returns that id and starts nothing: a retry after
            a lost answer is safe.
    """
    extra = [*(["--run-name", run_name] if run_name else []), *(["--no-cache"] if no_cache else [])]
    jobs = client(address)
    runtime_env = {
        "working_dir": str(PROJECT),
        "excludes": _EXCLUDES,
        # Unbuffered, so `--follow` shows each progress line as it is printed. On `stop`, Ray sends
        # SIGTERM and, by default, SIGKILL 3 s later: too soon for the pipeline to mark its MLflow
        # runs KILLED on a busy store (the job's supervisor reads this from the job's env_vars).
        "env_vars": {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": "30", **env},
    }
    metadata = {"gptforge.experiment": experiment_name, "gptforge.run_name": run_name or ""}
    try:
        return jobs.submit_job(entrypoint=job_entrypoint(experiment, overrides, extra), runtime_env=runtime_env,
                               submission_id=submission_id, metadata=metadata)
    except Exception as error:  # noqa: BLE001 - the SDK raises RuntimeError with the server's reason
        if submission_id and f"submission_id {submission_id} already exists" in str(error):
            return submission_id  # submitted before (an earlier try whose answer was lost)
        raise JobError(f"the job server at {resolve_address(address)} refused the job: {_reason(error)}") from None


def list_jobs(address: str | None = None, experiment: str | None = None) -> list[JobInfo]:
    """The cluster's jobs (only `experiment`'s when given), newest first."""
    infos = []
    for job in _call(lambda c: c.list_jobs(), address, None):
        meta = job.metadata or {}
        if experiment is not None and meta.get("gptforge.experiment") != experiment:
            continue
        infos.append(JobInfo(job.submission_id or job.job_id or "", str(job.status.value), meta.get(
            "gptforge.experiment", ""), meta.get("gptforge.run_name", ""),
            job.start_time / 1000 if job.start_time else None, job.entrypoint, job.message or ""))
    return sorted(infos, key=lambda j: j.start_time or 0, reverse=True)


def status(job_id: str, address: str | None = None) -> str:
    return str(_call(lambda c: c.get_job_status(job_id), address, job_id).value)


def logs(job_id: str, address: str | None = None) -> str:
    return _call(lambda c: c.get_job_logs(job_id), address, job_id)


def stop(job_id: str, address: str | None = None) -> bool:
    """Ask the job to stop; False when it had already ended."""
    return bool(_call(lambda c: c.stop_job(job_id), address, job_id))


def follow(job_id: str, address: str | None = None, out=None) -> str:
    """Print the job's output as it comes until the job ends; returns its final status."""
    out = out or sys.stdout
    jobs = client(address)
    _call(lambda c: c.get_job_status(job_id), address, job_id, jobs)  # an unknown id fails here, plainly

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    final = str(jobs.get_job_status(job_id).value)
    while final not in _FINAL:  # the log stream can close a moment before the status is final
        import time

        time.sleep(0.5)
        final = str(jobs.get_job_status(job_id).value)
    return final


def _call(work, address: str | None, job_id: str | None, jobs=None):
    jobs = jobs or client(address)
    try:
        return work(jobs)
    except Exception as error:  # noqa: BLE001 - RuntimeError (an error status), AuthenticationError, requests' errors
        text = _reason(error)
        if job_id is not None and ("does not exist" in text or "404" in text):
            raise JobError(f"no job {job_id!r} at {resolve_address(address)}; `gptforge jobs` lists them") from None
        raise JobError(f"the job server at {resolve_address(address)} failed: {text}") from None


def _reason(error: BaseException) -> str:
    """What the job server said, in a line: its first, or the last of a Python traceback it sent back."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback (most recent call last)" in lines[0]:
        head = lines[0].split("Traceback")[0].strip()
        last = next((line for line in reversed(lines) if line != "."), lines[-1])
        return error_line(RuntimeError(f"{head} {last}"), 500)
    return error_line(error, 500)

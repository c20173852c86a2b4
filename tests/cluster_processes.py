"""The processes of a real two-node Ray cluster on one machine, and an S3 server beside it.

- `S3Server`: moto in server mode on 127.0.0.1 (a real S3 API over HTTP), with one bucket.
- `RayNode`: `ray start` on 127.0.0.1 with its own ports and temp dir; the worker node can be
  started inside a private mount namespace (`unshare --mount`, root only) in which chosen
  folders are hidden behind an empty tmpfs, so that node reaches data only through storage.
  Its nodes run with token authentication, as a cluster's do (`ensure_ray_token`).

Every process is stopped by pid: its session's processes and any naming its temp dir, never
with a bare `ray stop`, which would stop every Ray of this user on the machine.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.helpers import free_port

BIN = Path(sys.executable).parent
S3_ENV = {"AWS_ACCESS_KEY_ID": "gptforge-test", "AWS_SECRET_ACCESS_KEY": "gptforge-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def unshare_problem() -> str | None:
    """Why a private mount namespace cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "hiding folders from a Ray node needs `unshare --mount`, which needs root"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare --mount` is not permitted here: {probe.stderr.strip()}"
    return None


def _wait(ready, process: subprocess.Popen, what: str, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout  # a loaded 2-core machine is slow to start servers
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


class S3Server:
    """moto's S3 server on 127.0.0.1 with `bucket` created; `env` points clients at it."""

    def __init__(self, folder: Path, bucket: str = "gptforge"):
        self.bucket, self.port = bucket, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.endpoint}
        self.log_path = folder / "moto.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(self._answers, self.process, "moto S3 server", self.log_path)
            self.client().create_bucket(Bucket=bucket)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint, timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        stop_session(self.process)
        self._log.close()


def ensure_ray_token() -> None:
    """Give this test process, and every process it starts, a Ray auth token, unless one is there.

    Ray 2.60's `ray start --head` under RAY_AUTH_MODE=token refuses to start without a token (the
    README has users create one with `ray get-auth-token --generate`, in ~/.ray/auth_token). Tests
    must not write to the user's home, so on a machine without one the token lives in this
    process's environment (RAY_AUTH_TOKEN), which the nodes, their jobs and the CLI runs inherit.
    Outside token mode Ray ignores it."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if (Path.home() / ".ray" / "auth_token").is_file():
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


class RayNode:
    """One `ray start` node on 127.0.0.1; the head when `head_address` is None.

    Args:
        resources: custom resources of the node (Ray's `--resources`).
        hide: folders this node must not see: it runs in a private mount namespace with an
            empty tmpfs over each (needs root; see `unshare_problem`).
        env: added to the node's environment (credentials a cluster node would have).
    """

    def __init__(self, num_cpus: int, head_address: str | None = None, resources: dict | None = None,
                 hide: tuple[Path, ...] = (), env: dict | None = None):
        ensure_ray_token()
        # Short: Ray's unix sockets live below it, and socket paths are limited to 107 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="gfn", dir="/tmp")
        self.log_path = Path(self.temp_dir) / "start.log"
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")},
                    "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", **(env or {})}
        command = [str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir,
                   "--num-cpus", str(num_cpus), "--disable-usage-stats", "--block",
                   "--resources", json.dumps(resources or {})]
        if head_address is None:
            self.gcs_port, dashboard = free_port(), free_port()
            self.gcs_address = f"127.0.0.1:{self.gcs_port}"
            self.dashboard_url = f"http://127.0.0.1:{dashboard}"
            command += ["--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()),
                        "--dashboard-agent-listen-port", str(free_port())]
        else:
            self.gcs_address = head_address
            command += ["--address", head_address, "--dashboard-agent-listen-port", str(free_port())]
        if hide:
            mounts = " && ".join(f"mount -t tmpfs -o size=16m gptforge-hidden {shlex.quote(str(p))}" for p in hide)
            command = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                       f"{mounts} && exec {shlex.join(command)}"]
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_until_in_cluster(self, expected_nodes: int) -> None:
        """Wait until the cluster this node belongs to counts `expected_nodes` alive nodes (and,
        on the head, until its job server answers)."""
        def counted() -> bool:
            status = subprocess.run([str(BIN / "ray"), "status", "--address", self.gcs_address],
                                    capture_output=True, text=True, env=self.env)
            return status.returncode == 0 and status.stdout.count("node_") >= expected_nodes and self._job_server_up()
        try:
            _wait(counted, self.process, "ray node", self.log_path)
        except BaseException:
            self.stop()
            raise

    def _job_server_up(self) -> bool:
        if not hasattr(self, "dashboard_url"):
            return True  # a worker node has none
        try:
            with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2):
                return True
        except urllib.error.HTTPError:  # 401 without the token: the job server is up
            return True
        except OSError:
            return False

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _pids_of(self.process.pid, self.temp_dir):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(2)
        self.process.wait()
        self._log.close()


def stop_session(process: subprocess.Popen, timeout_s: float = 20) -> None:
    """SIGTERM to the session `process` leads (started with start_new_session), SIGKILL after `timeout_s`."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _pids_of(session: int, temp_dir: str) -> list[int]:
    """A node's processes: those of its session (Ray workers get their own process group, not
    session) and any naming its temp dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text()
            sid = int(stat[stat.rindex(")") + 2:].split()[3])  # fields after "(comm)": state ppid pgrp session
            if sid == session or temp_dir.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, ValueError):
            pass
    return pids


def mount_namespace(pid: int) -> str:
    """The mount namespace of a process (`mnt:[...]`): equal for processes that see the same folders."""
    return os.readlink(f"/proc/{pid}/ns/mnt")

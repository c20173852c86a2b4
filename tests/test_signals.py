"""SIGTERM (what systemd, Docker and `kill` send) stops a real `gptforge serve` as Ctrl-C does, at any moment:
every process it started (Ray's daemons, workers, Serve replicas, HAProxy) is gone afterwards and the port is
free; HAProxy's admin socket is out of other users' reach while it serves; `gptforge schedule` stops the same way."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import TINY_EXPERIMENT, cli_command, cli_env, free_port, promote_candidates

pytestmark = pytest.mark.integration

SIGTERM_STATUS = 128 + signal.SIGTERM
NOBODY = 65534


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir whose local registry has a champion (a tiny real model) for `gptforge serve` to serve."""
    from components.experiment_file import load_config
    from pipelines.tracking import Tracker

    workdir = tmp_path_factory.mktemp("signals")
    cfg = load_config(str(TINY_EXPERIMENT), [f"workdir={workdir}"])
    decision, _ = promote_candidates(Tracker.for_experiment(cfg), cfg, workdir, {"fp32": 10.0})
    assert decision.promote
    return workdir


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "(comm)": state ppid ... starttime is the 20th
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class Command:
    """A `gptforge` command in a process of its own, with every descendant it ever had recorded (by pid
    and start time, so a reused pid does not count) while it runs: those are the processes that must be
    gone after it stops, wherever they were reparented to. `gptforge serve` unless told otherwise."""

    def __init__(self, workdir: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.log_path = workdir / f"gptforge-{self.port}.log"
        self._log = open(self.log_path, "w")
        args = args or ("serve", str(TINY_EXPERIMENT), f"workdir={workdir}", f"serve.port={self.port}",
                        "serve.poll_interval_s=0", "ray_num_cpus=2")
        self.process = subprocess.Popen(cli_command(*args), cwd=workdir, env=cli_env(env), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[tuple[int, int], list[str]] = {}  # (pid, start time) -> command line
        self._watching = True
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        while self._watching:
            children: dict[int, list[int]] = {}
            for entry in os.listdir("/proc"):
                if entry.isdigit() and (stat := _stat(int(entry))) is not None:
                    children.setdefault(stat[1], []).append(int(entry))
            todo = list(children.get(self.process.pid, []))
            while todo:
                pid = todo.pop()
                stat = _stat(pid)
                if stat is not None and (pid, stat[2]) not in self.seen:
                    self.seen[(pid, stat[2])] = _cmdline(pid)
                todo.extend(children.get(pid, []))
            time.sleep(0.2)

    def output(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, ready, what: str, timeout: float = 400) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            assert self.process.poll() is None, f"gptforge serve ended before {what}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"no {what} within {timeout}s:\n{self.output()[-4000:]}"
            time.sleep(0.1)

    def _seen(self) -> list[tuple[tuple[int, int], list[str]]]:
        """A copy of `seen`: the watcher thread adds to it while the test reads it."""
        return list(self.seen.items())

    def haproxy_pids(self) -> list[int]:
        return [pid for (pid, _), cmd in self._seen() if cmd and os.path.basename(cmd[0]).startswith("haproxy")]

    def running_haproxy(self) -> list[int]:
        alive = self.survivors()
        return [pid for pid in self.haproxy_pids() if pid in alive]

    def survivors(self) -> dict[int, list[str]]:
        alive = {}
        for (pid, started), cmd in self._seen():
            stat = _stat(pid)
            if stat is not None and stat[2] == started and stat[0] != "Z":
                alive[pid] = cmd
        return alive

    def terminate(self, timeout: float = 120) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            time.sleep(0.5)  # one more look at the tree, for anything started just before the end
            self._watching = False
            self._watcher.join()

    def close(self) -> None:
        """Whatever happened in the test, leave nothing running."""
        self._watching = False
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.survivors():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture
def gptforge(workdir):
    """Start `gptforge` commands (`Command`) in `workdir`; whatever they left running is killed afterwards."""
    started = []

    def start(*args: str, env: dict | None = None) -> Command:
        started.append(Command(workdir, *args, env=env))
        return started[-1]

    yield start
    for s in started:
        s.close()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _stops_cleanly(server: Command) -> None:
    status = server.terminate()
    output = server.output()
    assert status == SIGTERM_STATUS, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    deadline = time.monotonic() + 20  # workers notice their raylet's end within a few seconds
    while (left := server.survivors()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, "still running after gptforge serve ended:\n" + "\n".join(
        f"{pid}: {' '.join(cmd)[:200]}" for pid, cmd in left.items())
    assert _port_free(server.port)


@pytest.mark.parametrize("moment", ["deploy starts", "HAProxy is up, deploy still running"])
def test_sigterm_during_the_deploy_stops_every_process_serve_started(gptforge, moment):
    server = gptforge()
    if moment == "deploy starts":
        server.wait_for(lambda: "==> deploy (Ray Serve)" in server.output(), "the deploy stage")
    else:
        # HAProxy starts with Serve's proxy, before the replica has loaded the model and answered.
        server.wait_for(lambda: server.haproxy_pids(), "an HAProxy process")
    _stops_cleanly(server)


def _connect_as(uid: int, path: Path) -> str:
    """Connect to a unix socket from a child process running as `uid`: "connected", "refused" or "failed"."""
    import socket

    child = os.fork()
    if child == 0:  # the child only switches user, connects and exits
        outcome = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            socket.socket(socket.AF_UNIX).connect(str(path))
            outcome = 0
        except PermissionError:
            outcome = 1
        finally:
            os._exit(outcome)
    _, status = os.waitpid(child, 0)
    return ["connected", "refused", "failed"][os.waitstatus_to_exitcode(status)]


def _admin_socket(cmdline: list[str]) -> Path:
    config = Path(cmdline[cmdline.index("-f") + 1])
    return Path(re.search(r"^\s*stats socket (\S+)", config.read_text(), re.M).group(1))


def test_while_serving_the_admin_socket_is_private_and_sigterm_stops_everything(gptforge):
    server = gptforge()
    server.wait_for(lambda: "Serving at" in server.output(), "the endpoint")
    assert _healthy(server.port)
    server.wait_for(lambda: server.running_haproxy(), "a running HAProxy")
    socket_path = _admin_socket(_cmdline(server.running_haproxy()[0]))  # an old one of a reload: the same file
    assert socket_path.exists()
    # The folder is this user's own and closed to everyone else (the socket's own mode comes from
    # Ray's HAProxy template; a folder others cannot enter keeps them from connecting to it).
    private = [p for p in socket_path.parents if p.stat().st_uid == os.getuid() and p.stat().st_mode & 0o077 == 0]
    assert private, f"every folder above {socket_path} is open to other users"
    if os.getuid() == 0:  # as another user, try what an attacker would: connect to the admin socket
        assert _connect_as(NOBODY, socket_path) == "refused", f"another user reached {socket_path}"
    _stops_cleanly(server)
    assert not private[0].exists()  # removed with the rest



def test_stop_haproxy_stops_an_orphaned_haproxy_by_pid_and_removes_its_folder(monkeypatch):
    """What a Serve worker killed before it could stop its HAProxy leaves behind: a real HAProxy, its
    files in the private folder, holding the port; `stop_haproxy` finds it by its command line."""
    from ray.serve._private.haproxy import get_haproxy_binary

    from pipelines import serving

    for variable in serving._HAPROXY_FILES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    folder = Path(serving.isolate_haproxy())
    assert folder.stat().st_mode & 0o777 == 0o700 and folder.stat().st_uid == os.getuid()
    assert os.environ["RAY_SERVE_HAPROXY_SOCKET_PATH"] == str(folder / "admin.sock")
    node = folder / "node"  # Serve adds a folder per node
    node.mkdir()
    port = free_port()
    (node / "haproxy.cfg").write_text(
        f"global\n    stats socket {node}/admin.sock mode 666 level admin\n"
        "defaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n    timeout server 1s\n"
        f"frontend ingress\n    bind 127.0.0.1:{port}\n    http-request return status 200\n")
    haproxy = subprocess.Popen([get_haproxy_binary(), "-db", "-f", str(node / "haproxy.cfg")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while _port_free(port):
            assert haproxy.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        serving.stop_haproxy()
        assert haproxy.wait(timeout=5) is not None  # it was signalled, not left to the test's clean-up
    finally:
        if haproxy.poll() is None:
            haproxy.kill()
            haproxy.wait()
    assert _port_free(port) and not folder.exists()
    assert "RAY_SERVE_HAPROXY_SOCKET_PATH" not in os.environ  # the next Ray gets a folder of its own


def test_sigterm_stops_gptforge_schedule_as_ctrl_c_does(gptforge, workdir):
    from tests.cluster_processes import RayNode

    head = RayNode(2)  # the job server the scheduler would submit to
    try:
        head.wait_until_in_cluster(1)
        scheduler = gptforge("schedule", str(TINY_EXPERIMENT), f"workdir={workdir}", "--cron", "0 3 * * *",
                             "--address", head.dashboard_url, env={"PATH": head.env["PATH"]})
        scheduler.wait_for(lambda: "next run at" in scheduler.output(), "the scheduler's first tick")
        status = scheduler.terminate()
    finally:
        head.stop()
    output = scheduler.output()
    assert status == SIGTERM_STATUS and "stopped (SIGTERM)" in output and "Traceback" not in output, output
    assert not scheduler.survivors()

"""The Ray Serve deployment of the completions endpoint (`pipelines/http_app.py`) for the champion.

`deploy` starts Serve with one application, `gptforge`, whose replicas each load the
model the given loader returns (`pipelines/model_loading.py`) and answer over the
FastAPI app; `deployment_options` turns the experiment's `serve:` section into
Serve's replicas, resources and request caps. The section travels to the replicas
whole (a frozen dataclass pickles).

Serve's HAProxy ingress keeps an admin socket (level admin: it can re-point or disable
the backends) and its config in files; `isolate_haproxy` puts them in a folder of this
user's own before an embedded Ray starts, and `stop_haproxy` stops, by pid, any HAProxy
still running from it once Ray is down.
"""
# No `from __future__ import annotations` here: FastAPI must see the real request
# type on the endpoint, or it reads `request` as a query parameter.
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
import urllib.request

from components.config import ServeConfig

APP_NAME = "gptforge"


class ServeError(RuntimeError):
    """The endpoint cannot start for a reason the user can fix (a busy port, a model its device cannot run)."""


def _deployment():
    from fastapi import Request
    from ray import serve

    from pipelines import http_app

    @serve.deployment(name=APP_NAME)
    @serve.ingress(http_app.api)
    class CompletionServer:
        def __init__(self, loader, cfg: ServeConfig):
            import torch

            torch.set_num_threads(1)  # the replica holds a fraction of a CPU
            import ray
            from ray import serve

            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
            self.engine = http_app.Engine(loader, cfg, device, serve.get_replica_context().replica_id.unique_id)

        def __del__(self):
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.stop()

        @http_app.api.get("/healthz")
        def healthz(self):
            return http_app.healthz(self.engine)

        @http_app.api.get("/v1/models")
        def models(self):
            return http_app.models(self.engine)

        @http_app.api.post("/v1/completions")
        async def completions(self, request: Request):
            return await http_app.complete(self.engine, request)

        @http_app.api.post("/v1/chat/completions")
        async def chat_completions(self, request: Request):
            return await http_app.chat_complete(self.engine, request)

    return CompletionServer


def deploy(loader, cfg: ServeConfig, timeout_s: float = 120.0) -> str:
    """Start Serve on cfg.host:cfg.port with the model `loader` gives; returns the base URL once healthy.

    Ray must be initialised. On any failure Serve is shut down again, so no detached
    application is left holding the port (on a cluster it would outlive this process).

    Raises:
        ServeError: the port is busy. TimeoutError: not healthy within `timeout_s`.
        RuntimeError: the replica failed to start (Serve's message says why).
    """
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    _check_port_free(cfg.host, cfg.port)
    url = f"http://{cfg.host}:{cfg.port}"
    deadline = time.monotonic() + timeout_s
    try:
        serve.start(http_options={"host": cfg.host, "port": cfg.port})
        app = _deployment().options(**deployment_options(cfg)).bind(loader, cfg)
        # serve.run waits, without a limit, until the replica is up: one that never gets its
        # CPUs would hang there. So the deploy returns at once and the wait is ours, with the
        # deadline, on this thread: a waiting helper thread would outlive a timeout and, after
        # Ray is shut down, start a new Ray from inside Serve's polling (it ended test runs).
        serve.run_many([serve.RunTarget(app, name=APP_NAME, route_prefix="/")],
                       wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        _wait_running(deadline, timeout_s)
        _wait_healthy(url, deadline, timeout_s)
    except BaseException:
        shutdown()
        raise
    return url


def deployment_options(cfg: ServeConfig) -> dict:
    """Serve's deployment options: replicas or autoscaling, resources, and the request caps."""
    from pipelines.ray_runtime import worker_resources

    options = {"ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus,
                                     "resources": worker_resources()},
               # Serve hands a replica at most max_ongoing_requests requests at once, and only
               # requests the replica holds can share a batch: Serve's default of 5 would cap
               # every batch at 5 rows, so the cap is never below the batch size.
               "max_ongoing_requests": max(cfg.max_ongoing_requests, cfg.max_batch_size),
               "max_queued_requests": cfg.max_queued_requests}
    if cfg.max_replicas > cfg.num_replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.num_replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def _check_port_free(host: str, port: int) -> None:
    # Serve's proxy would fail to bind in the background and leave us waiting for /healthz.
    with socket.socket() as s:
        # As the ingress (HAProxy or Serve's uvicorn) binds: a previous server's connections in
        # TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as error:
            raise ServeError(f"cannot serve on {host}:{port} ({error.strerror}); stop what uses the port "
                             f"or pick another with serve.port=PORT") from None


def _wait_running(deadline: float, timeout_s: float) -> None:
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    while True:
        application = serve.status().applications.get(APP_NAME)
        if application is not None and application.status == ApplicationStatus.RUNNING:
            return
        if application is not None and application.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"Deploying application {APP_NAME} failed: {application.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Serve application {APP_NAME!r} did not start within {timeout_s:.0f}s")
        time.sleep(0.5)


def _wait_healthy(url: str, deadline: float, timeout_s: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the Serve endpoint {url} did not become healthy within {timeout_s:.0f}s")
        time.sleep(0.5)


def shutdown() -> None:
    from ray import serve

    serve.shutdown()


# Where Ray Serve keeps HAProxy's files (it adds a folder per node below each). Its defaults
# are shared folders under /tmp, and the admin socket it writes there is mode 666.
_HAPROXY_FILES = {
    "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
    "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
    "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": "",
    "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
}
_haproxy_folder: str | None = None


def isolate_haproxy() -> str | None:
    """Before an embedded Ray starts: HAProxy's admin socket, config and state go to a new folder (mode 700).

    Ray Serve's HAProxy template makes the admin socket mode 666, which this cannot change,
    but nobody else can reach a socket inside a folder they may not enter. Ray's processes
    read the location from the environment they inherit, so this is a no-op under
    RAY_ADDRESS (the cluster's nodes set their own) or when the user set any location.
    Returns the folder, or None when nothing was changed.
    """
    global _haproxy_folder
    if _haproxy_folder is not None or os.environ.get("RAY_ADDRESS") or any(v in os.environ for v in _HAPROXY_FILES):
        return None
    # /tmp and a short name: a unix socket's path may have 107 bytes, and HAProxy binds
    # <folder>/<56-character node id>/admin.sock.<pid>.tmp first.
    _haproxy_folder = tempfile.mkdtemp(prefix="gfserve-", dir="/tmp")
    for variable, name in _HAPROXY_FILES.items():
        os.environ[variable] = os.path.join(_haproxy_folder, name) if name else _haproxy_folder
    return _haproxy_folder


def stop_haproxy(grace_s: float = 5.0) -> None:
    """After Ray is shut down: stop any HAProxy still running from the `isolate_haproxy` folder, and remove it.

    Serve stops its HAProxy when it shuts down cleanly, but HAProxy is the child of a
    Serve worker, and a worker killed first (Ray shut down mid-deploy, or after Serve failed
    to stop) leaves it running with parent 1, holding the port. Found by its command line,
    which names its config file in that folder: SIGTERM, then SIGKILL after `grace_s`.
    """
    global _haproxy_folder
    folder, _haproxy_folder = _haproxy_folder, None
    if folder is None:
        return
    try:
        pids = _processes_naming(folder)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while (pids := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not pids:
                break
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for variable in _HAPROXY_FILES:
            os.environ.pop(variable, None)  # a later Ray of this process gets a folder of its own again


def _processes_naming(folder: str) -> list[int]:
    """Pids of this user's processes with an argument inside `folder` (Linux /proc; none elsewhere)."""
    inside = folder.encode() + b"/"
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if any(arg.startswith(inside) for arg in f.read().split(b"\0")):
                    pids.append(int(entry))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped already
    except OSError:
        return False

"""The Ray Serve deployment of the completions endpoint (`pipelines/http_app.py`) for the champion.

`deploy` starts Serve with one application, `gptforge`, whose replicas each load the
model the given loader returns (`pipelines/model_loading.py`) and answer over the
FastAPI app; `deployment_options` turns the experiment's `serve:` section into
Serve's replicas, resources and request caps. The section travels to the replicas
whole (a frozen dataclass pickles).
"""
# No `from __future__ import annotations` here: FastAPI must see the real request
# type on the endpoint, or it reads `request` as a query parameter.
import logging
import socket
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
    options = {"ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
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

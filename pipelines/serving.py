"""The Ray Serve application: an OpenAI-compatible completions endpoint for the champion.

The deployment takes its model loader as an argument (house style 7): the CLI
hands it `RegistryLoader` (download `models:/NAME@champion`, check its files
against the sha256 pinned on the registry version, load), tests may hand it
`FolderLoader` on a model folder they made.

Endpoints: `POST /v1/completions` (OpenAI's fields, streaming as server-sent
events; `components/completions.py` says which fields do what), `GET /v1/models`,
`GET /healthz`. Every request is validated; bad input gets a 4xx in OpenAI's
error shape (`{"error": {"message", "type", "param", "code"}}`), never a 5xx.

Inside a replica: requests are tokenized and queued; one thread runs them in
batches on one KV cache (`components/batching.py`, `components/generation.py`).
A full queue answers 503 with Retry-After at once. With a `RegistryLoader`, a
thread polls the registry alias; when it moves (a pipeline run, `gptforge
promote`, `--rollback`) the new version is loaded beside the old one and then
swapped in with one assignment: queued and running requests finish on the model
they were admitted with, new ones get the new one. Every answer names the model
version that produced it (`model` and the `x-gptforge-model-version` header).
"""
# No `from __future__ import annotations` here: FastAPI must see the real request
# type on the endpoint, or it reads `request` as a query parameter.
import asyncio
import json
import logging
import os
import shutil
import socket
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from components import completions as api_shapes
from components.completions import Limits, RequestError
from components.config import ServeConfig
from components.files import IntegrityError

APP_NAME = "gptforge"
EOT_ID = 0  # components.data.EOT is id 0 in every tokenizer gptforge trains
VERSION_HEADER = "x-gptforge-model-version"
REPLICA_HEADER = "x-gptforge-replica"  # which replica answered (with several, HAProxy spreads the requests)


@dataclass
class LoadedModel:
    model: object  # a GPT or a quantized GPT: has .generate and .config
    tokenizer: object  # tokenizers.Tokenizer
    model_id: str  # what /v1/models and responses call it, e.g. "tiny:v3"
    version: str | None = None  # the registry version, when it came from the registry
    run_id: str | None = None  # the MLflow run that produced it
    precision: str = "fp32"  # the stored variant: fp32, bf16, int8_dynamic, ...
    parameters: int = 0
    text: object = field(default=None, repr=False)  # components.generation.TokenText of the tokenizer

    def __post_init__(self):
        from components.generation import TokenText
        from components.model import parameter_counts

        if self.text is None:
            self.text = TokenText(self.tokenizer, self.model.config.vocab_size)
        if not self.parameters:
            self.parameters = parameter_counts(self.model)["total"]

    def describe(self, created: int) -> dict:
        """The /v1/models entry: OpenAI's fields plus what a caller needs to trust the model."""
        name = self.model_id.split(":")[0]
        return {"id": self.model_id, "object": "model", "created": created, "owned_by": "gptforge",
                "name": name, "version": self.version, "run_id": self.run_id,
                "parameters": self.parameters, "precision": self.precision}


@dataclass(frozen=True)
class FolderLoader:
    """Load a candidate folder: exactly model.safetensors + config.json + tokenizer.json + checksums.json.

    `checksums_sha256`, when given, is the registry's pin of checksums.json (see
    `pipelines.tracking.CHECKSUMS_TAG`); without it the folder is only checked against itself.
    """

    folder: str
    model_id: str = "local"
    checksums_sha256: str | None = None
    version: str | None = None
    run_id: str | None = None

    def verify(self) -> None:
        """Raises IntegrityError naming the file that is missing, extra, unlisted or altered."""
        from components.files import verify_checksums
        from components.quantize import CANDIDATE_FILES

        verify_checksums(self.folder, CANDIDATE_FILES, self.checksums_sha256)

    def __call__(self, device: str = "cpu") -> LoadedModel:
        self.verify()
        return self._load(device)

    def precision(self) -> str:
        with open(os.path.join(self.folder, "config.json")) as f:
            return json.load(f).get("quantization", "fp32")

    def check_device(self, device: str) -> None:
        """Raises ServeError when the stored variant cannot run on `device` (int4 needs CUDA)."""
        from components.quantize import RUNS_ON

        precision = self.precision()
        if device.split(":")[0] not in RUNS_ON.get(precision, ()):
            raise ServeError(f"{self.model_id} is a {precision} model, which runs only on "
                             f"{'/'.join(RUNS_ON.get(precision, ()))}; this endpoint runs on {device}. Serve it "
                             f"with serve.num_gpus=1 on a GPU machine, or promote another version "
                             f"(gptforge promote EXPERIMENT --version N)")

    def _load(self, device: str = "cpu") -> LoadedModel:
        from tokenizers import Tokenizer

        from components.quantize import load_variant

        self.check_device(device)
        return LoadedModel(load_variant(self.folder, device), Tokenizer.from_file(f"{self.folder}/tokenizer.json"),
                           self.model_id, self.version, self.run_id, self.precision())


@dataclass(frozen=True)
class RegistryLoader:
    """Load the version an alias of a registered model points at (by default `champion`).

    Files are downloaded once per version into `cache_dir/<name>-v<version>` and
    checked at every load against the sha256 the registry pinned at registration.
    A cached copy that fails the check is discarded and downloaded once more;
    a fresh download that fails it is refused.
    """

    tracking_uri: str
    model_name: str
    cache_dir: str
    alias: str = "champion"

    def fetch(self) -> FolderLoader:
        """Download (unless cached) and verify the version's files; returns a loader for the checked folder.

        Raises:
            LookupError: no such model or alias. TrackingError: the registry failed.
            IntegrityError: the files do not match the registry's record, even freshly downloaded.
        """
        from pipelines.tracking import CHECKSUMS_TAG, download_version, find_alias, redact

        version = find_alias(self.tracking_uri, self.model_name, self.alias)
        model_id = f"{self.model_name}:v{version.version}"
        pinned = version.tags.get(CHECKSUMS_TAG)
        if not pinned:
            raise IntegrityError(f"{model_id} has no {CHECKSUMS_TAG} tag in the registry at "
                                 f"{redact(self.tracking_uri)}, so its files cannot be verified; refusing to serve it "
                                 f"(register it again with `gptforge run`)")
        target = Path(self.cache_dir) / f"{self.model_name}-v{version.version}"
        loader = FolderLoader(str(target), model_id, pinned, str(version.version), version.run_id)
        if target.exists():
            try:
                loader.verify()
                return loader
            except IntegrityError as error:
                logging.getLogger(__name__).warning("discarding the damaged cached copy of %s: %s", model_id, error)
        # A name of its own: replicas and the CLI may download the same version at once.
        staging = target.with_name(f"{target.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        shutil.rmtree(staging, ignore_errors=True)
        folder = download_version(self.tracking_uri, version, str(staging))
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(folder, target)  # a complete folder or none under the final name
        except OSError:
            if not target.exists():  # otherwise another process put its verified copy there first
                raise
        shutil.rmtree(staging, ignore_errors=True)
        loader.verify()
        return loader

    def __call__(self, device: str = "cpu") -> LoadedModel:
        return self.fetch()._load(device)

    def current_version(self) -> str:
        """The version the alias points at now (one registry call; the endpoint polls it)."""
        from pipelines.tracking import find_alias

        return str(find_alias(self.tracking_uri, self.model_name, self.alias).version)


api = FastAPI(title="gptforge", description="OpenAI-compatible completions from the gptforge champion")


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content=error.body(), headers=error.headers)


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError):
    return _error_response(error)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError):
    problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
    return _error_response(RequestError(400, "; ".join(problems)))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, error: StarletteHTTPException):
    # Unknown paths (404) and wrong methods (405), in the same shape.
    return _error_response(RequestError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                        headers=dict(error.headers or {})))


@api.exception_handler(Exception)
async def _bug(request: Request, error: Exception):
    logging.getLogger(__name__).exception("unexpected error answering %s", request.url.path)
    return _error_response(RequestError(500, f"internal error ({type(error).__name__}); see the replica's log",
                                        error_type="server_error"))


class _Reply:
    """One request's side of the batch loop: deltas from the batch thread, read on the event loop.

    A streamed request wakes the event loop for every delta; any other request only once per
    choice, when it has finished (its deltas are gathered on the batch thread meanwhile), so
    a plain completion costs the loop one wake-up, not one per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: int, stream: bool):
        self.loop, self.queue, self.open, self.stream = loop, asyncio.Queue(), choices, stream

    def emitter(self, index: int):
        if self.stream:
            return lambda delta: self._put((index, [delta]))
        gathered: list = []

        def gather(delta):
            gathered.append(delta)
            if delta.finish_reason is not None:
                self._put((index, gathered))
        return gather

    def fail(self, error: BaseException) -> None:
        self._put((None, error))

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop closed (the replica is stopping): nobody is waiting any more
            pass

    async def deltas(self):
        """(choice index, Delta) until every choice has finished; raises what failed the batch."""
        while self.open:
            index, deltas = await self.queue.get()
            if index is None:
                raise deltas
            for delta in deltas:
                if delta.finish_reason is not None:
                    self.open -= 1
                yield index, delta


class Engine:
    """The replica's model, its batching loop, and the registry watcher that swaps models."""

    def __init__(self, loader, limits: dict, device: str, replica: str):
        from components.batching import Batcher
        from components.generation import batch_fits

        self.loader, self.limits, self.device, self.replica = loader, limits, device, replica
        self.current: LoadedModel = loader(device) if _takes_device(loader) else loader()
        self.created = int(time.time())
        self.batcher = Batcher(self._run_batch, limits["max_batch_size"], limits["batch_wait_timeout_s"],
                               limits["max_queued_rows"],
                               fits=lambda loaded, rows: batch_fits(rows, loaded.model.config.block_size))
        self._stop = threading.Event()
        poll = limits.get("poll_interval_s", 0)
        if poll and hasattr(loader, "current_version"):
            threading.Thread(target=self._watch, args=(poll,), name="gptforge-registry-watch", daemon=True).start()

    def _run_batch(self, loaded: LoadedModel, works: list) -> None:
        from components.generation import generate_batch

        generate_batch(loaded.model, loaded.text, [row for w in works for row in w.rows], EOT_ID)

    def _watch(self, interval_s: float) -> None:
        """Follow the registry alias: load a new version beside the old one, then swap the reference."""
        log = logging.getLogger(__name__)
        while not self._stop.wait(interval_s):
            try:
                version = self.loader.current_version()
                if version == self.current.version:
                    continue
                log.warning("the alias %s@%s moved to v%s; loading it", self.loader.model_name,
                            self.loader.alias, version)
                loaded = self.loader(self.device)
                self.current = loaded  # one assignment: requests admitted before keep the old object
                log.warning("now serving %s", loaded.model_id)
            except Exception as error:  # noqa: BLE001 - keep serving the old model, try again next time
                log.warning("could not switch models (still serving %s): %s", self.current.model_id, error)

    def stop(self) -> None:
        self._stop.set()
        self.batcher.stop()


def _takes_device(loader) -> bool:
    return isinstance(loader, (FolderLoader, RegistryLoader))


def _deployment():
    from ray import serve

    @serve.deployment(name=APP_NAME)
    @serve.ingress(api)
    class CompletionServer:
        def __init__(self, loader, limits: dict):
            import torch

            torch.set_num_threads(1)  # the replica holds a fraction of a CPU
            import ray
            from ray import serve

            device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
            self.engine = Engine(loader, limits, device, serve.get_replica_context().replica_id.unique_id)
            self.limits = Limits(**{k: limits[k] for k in ("max_body_bytes", "max_prompt_chars", "max_tokens_cap",
                                                           "max_choices")})

        def __del__(self):
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.stop()

        @api.get("/healthz")
        def healthz(self) -> JSONResponse:
            loaded = self.engine.current
            return JSONResponse({"status": "ok", "model": loaded.model_id,
                                 "queued": self.engine.batcher.queued_rows()},
                                headers={VERSION_HEADER: loaded.model_id})

        @api.get("/v1/models")
        def models(self) -> JSONResponse:
            loaded = self.engine.current
            return JSONResponse({"object": "list", "data": [loaded.describe(self.engine.created)]},
                                headers={VERSION_HEADER: loaded.model_id})

        @api.post("/v1/completions")
        async def completions(self, request: Request):
            return await _complete(self.engine, self.limits, request)

    return CompletionServer


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes `limit` bytes: a huge upload is not read to the end."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body has {declared} bytes, more than the limit of {limit} "
                                f"(serve.max_body_bytes)", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"the request body is larger than the limit of {limit} bytes "
                                    f"(serve.max_body_bytes)", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _complete(engine: Engine, limits: Limits, request: Request):
    import torch

    from components.batching import Overloaded, Work
    from components.generation import Row

    received = time.monotonic()
    body = await _read_body(request, limits.max_body_bytes)
    req = api_shapes.parse_request(body, limits)
    loaded = engine.current  # this request runs on this model, even if another is swapped in meanwhile
    api_shapes.check_model(req, loaded.model_id)
    sampling = api_shapes.sampling_of(req)
    prompts = req.prompts
    ids = [loaded.tokenizer.encode(p).ids for p in prompts]
    api_shapes.check_context([len(i) for i in ids], sampling.max_tokens, loaded.model.config.block_size,
                             isinstance(req.prompt, str))
    n = req.choices_per_prompt
    reply = _Reply(asyncio.get_running_loop(), len(prompts) * n, bool(req.stream))
    # One generator per request, drawn from in row order: a seed gives the same choices every time.
    generator = torch.Generator().manual_seed(req.seed if req.seed is not None else
                                              int.from_bytes(os.urandom(8), "little") >> 1)
    rows = [Row(ids[p], prompts[p], sampling, reply.emitter(p * n + j), generator)
            for p in range(len(prompts)) for j in range(n)]
    work = Work(rows, loaded, reply.fail)
    try:
        engine.batcher.submit(work)
    except Overloaded as error:
        raise RequestError(503, str(error), code="overloaded", error_type="server_overloaded",
                           headers={"Retry-After": str(error.retry_after_s)}) from None
    cid = api_shapes.new_id()
    prompt_tokens = sum(len(i) for i in ids)
    headers = {VERSION_HEADER: loaded.model_id, REPLICA_HEADER: engine.replica}
    want_logprobs = req.logprobs is not None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_events(reply, cid, loaded.model_id, want_logprobs, include_usage, prompt_tokens),
                                 media_type="text/event-stream", headers=headers)
    choices: list[list] = [[] for _ in rows]
    async for index, delta in reply.deltas():
        choices[index].append(delta)
    generated = time.monotonic()
    content = api_shapes.completion_body(cid, loaded.model_id, choices, want_logprobs, prompt_tokens)
    headers["Server-Timing"] = _server_timing(received, work, generated)
    return JSONResponse(content, headers=headers)


def _server_timing(received: float, work, generated: float) -> str:
    """Where a request's time went inside the replica (W3C Server-Timing, milliseconds).

    admit: body read, validated, tokenized, queued; queue: waiting for its batch;
    generate: its batch's work until its last token reached the event loop. What a client
    measures beyond their sum is Serve's and HTTP's share (benchmarks/serving.py splits it so).
    """
    started = work.started_at if work.started_at is not None else generated
    parts = {"admit": work.queued_at - received, "queue": started - work.queued_at, "generate": generated - started,
             "replica": generated - received}
    return ", ".join(f"{name};dur={1000 * max(0.0, value):.2f}" for name, value in parts.items())


async def _events(reply: _Reply, cid: str, model_id: str, want_logprobs: bool, include_usage: bool,
                  prompt_tokens: int):
    """Server-sent events in OpenAI's chunk format, then `data: [DONE]`."""
    completion_tokens = 0
    try:
        async for index, delta in reply.deltas():
            completion_tokens += delta.completion_tokens
            yield f"data: {json.dumps(api_shapes.chunk_body(cid, model_id, index, delta, want_logprobs))}\n\n"
    except Exception as error:  # noqa: BLE001 - the status line is sent already: report in the stream
        logging.getLogger(__name__).exception("a streamed completion failed")
        yield f"data: {json.dumps(RequestError(500, f'internal error ({type(error).__name__})', error_type='server_error').body())}\n\n"
    if include_usage:
        chunk = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model_id,
                 "choices": [], "usage": api_shapes.usage(prompt_tokens, completion_tokens)}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


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
        app = _deployment().options(**deployment_options(cfg)).bind(loader, engine_limits(cfg))
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


def engine_limits(cfg: ServeConfig) -> dict:
    """What a replica needs from the experiment's `serve:` section (a plain dict: it travels to the replica)."""
    keys = ("max_body_bytes", "max_prompt_chars", "max_tokens_cap", "max_choices", "max_batch_size",
            "batch_wait_timeout_s", "max_queued_rows", "poll_interval_s")
    return {k: getattr(cfg, k) for k in keys}


def deployment_options(cfg: ServeConfig) -> dict:
    """Serve's deployment options: replicas or autoscaling, resources, and the request caps."""
    options = {"ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
               # NOTES.md: the default of 5 would also cap how many requests could share a batch.
               "max_ongoing_requests": max(cfg.max_ongoing_requests, cfg.max_batch_size),
               "max_queued_requests": cfg.max_queued_requests}
    if cfg.max_replicas > cfg.num_replicas:
        options["autoscaling_config"] = {"min_replicas": cfg.num_replicas, "max_replicas": cfg.max_replicas,
                                         "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


class ServeError(RuntimeError):
    """The endpoint cannot start for a reason the user can fix (a busy port)."""


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

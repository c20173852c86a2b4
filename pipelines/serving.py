"""The Ray Serve application: an OpenAI-style completions endpoint for the champion.

The deployment takes its model loader as an argument (house style 7): the CLI
hands it `RegistryLoader` (download `models:/NAME@champion`, check its files
against the sha256 pinned on the registry version, load), tests may hand it
`FolderLoader` on a model folder they made.

Endpoints: `POST /v1/completions`, `GET /v1/models`, `GET /healthz`.
Every request is validated; bad input gets a 4xx in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`), never a 5xx.
"""
# No `from __future__ import annotations` here: FastAPI must see the real request
# type on the endpoint, or it reads `request` as a query parameter.
import logging
import os
import shutil
import socket
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from components.config import ServeConfig
from components.files import IntegrityError
from components.sampling import seed_problem, temperature_problem

APP_NAME = "gptforge"
EOT_ID = 0  # components.data.EOT is id 0 in every tokenizer gptforge trains


@dataclass
class LoadedModel:
    model: object  # a GPT or a quantized GPT: has .generate and .config
    tokenizer: object  # tokenizers.Tokenizer
    model_id: str  # what /v1/models and responses call it, e.g. "tiny:v3"


@dataclass(frozen=True)
class FolderLoader:
    """Load a candidate folder: exactly model.safetensors + config.json + tokenizer.json + checksums.json.

    `checksums_sha256`, when given, is the registry's pin of checksums.json (see
    `pipelines.tracking.CHECKSUMS_TAG`); without it the folder is only checked against itself.
    """

    folder: str
    model_id: str = "local"
    checksums_sha256: str | None = None

    def verify(self) -> None:
        """Raises IntegrityError naming the file that is missing, extra, unlisted or altered."""
        from components.files import verify_checksums
        from components.quantize import CANDIDATE_FILES

        verify_checksums(self.folder, CANDIDATE_FILES, self.checksums_sha256)

    def __call__(self) -> LoadedModel:
        self.verify()
        return self._load()

    def _load(self) -> LoadedModel:
        from tokenizers import Tokenizer

        from components.quantize import load_variant

        return LoadedModel(load_variant(self.folder), Tokenizer.from_file(f"{self.folder}/tokenizer.json"),
                           self.model_id)


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
        loader = FolderLoader(str(target), model_id, pinned)
        if target.exists():
            try:
                loader.verify()
                return loader
            except IntegrityError as error:
                logging.getLogger(__name__).warning("discarding the damaged cached copy of %s: %s", model_id, error)
        staging = target.with_name(target.name + ".download")
        shutil.rmtree(staging, ignore_errors=True)
        folder = download_version(self.tracking_uri, version, str(staging))
        shutil.rmtree(target, ignore_errors=True)
        os.replace(folder, target)  # a complete folder or none under the final name
        shutil.rmtree(staging, ignore_errors=True)
        loader.verify()
        return loader

    def __call__(self) -> LoadedModel:
        return self.fetch()._load()


class CompletionRequest(BaseModel):
    """The OpenAI completions request fields gptforge understands; others are ignored."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    model: str | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    seed: int | None = None


api = FastAPI(title="gptforge", description="OpenAI-style completions from the gptforge champion")


class RequestError(Exception):
    """A request the endpoint refuses; answered as an OpenAI error with `status_code`."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status_code, self.message, self.param, self.code = status_code, message, param, code


def _openai_error(status_code: int, message: str, param: str | None = None, code: str | None = None):
    return JSONResponse(status_code=status_code, content={"error": {
        "message": message, "type": "invalid_request_error", "param": param, "code": code}})


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError):
    return _openai_error(error.status_code, error.message, error.param, error.code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError):
    # pydantic's own checks (a missing prompt, a string for max_tokens), in the same shape.
    problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
    return _openai_error(422, "; ".join(problems))


def _deployment():
    from ray import serve

    @serve.deployment(name=APP_NAME, num_replicas=1)
    @serve.ingress(api)
    class CompletionServer:
        def __init__(self, loader, limits: dict):
            import torch

            torch.set_num_threads(1)  # the replica holds a fraction of a CPU
            self.loaded: LoadedModel = loader()
            self.limits = limits
            self.created = int(time.time())

        @api.get("/healthz")
        def healthz(self) -> dict:
            return {"status": "ok", "model": self.loaded.model_id}

        @api.get("/v1/models")
        def models(self) -> dict:
            return {"object": "list", "data": [
                {"id": self.loaded.model_id, "object": "model", "created": self.created, "owned_by": "gptforge"}]}

        @api.post("/v1/completions")
        def completions(self, request: CompletionRequest) -> dict:
            _check_model(request, self.loaded.model_id)
            _validate(request, self.limits)
            return _complete(self.loaded, request)

    return CompletionServer


def _validate(request: CompletionRequest, limits: dict) -> None:
    problems = []
    if not request.prompt:
        problems.append("prompt: must not be empty")
    if len(request.prompt) > limits["max_prompt_chars"]:
        problems.append(f"prompt: {len(request.prompt)} characters, more than the limit of {limits['max_prompt_chars']}")
    if not 1 <= request.max_tokens <= limits["max_tokens_cap"]:
        problems.append(f"max_tokens: must be between 1 and {limits['max_tokens_cap']}, got {request.max_tokens}")
    if temperature_problem(request.temperature):
        problems.append(f"temperature: {temperature_problem(request.temperature)}")
    if request.seed is not None and seed_problem(request.seed):
        problems.append(f"seed: {seed_problem(request.seed)}")
    if request.top_k is not None and request.top_k < 1:
        problems.append(f"top_k: must be at least 1, got {request.top_k}")
    if request.n != 1:
        problems.append("n: only n=1 is supported")
    if request.stream:
        problems.append("stream: streaming is not supported yet; send stream=false")
    if problems:
        raise RequestError(400, "; ".join(problems))


def _check_model(request: CompletionRequest, model_id: str) -> None:
    """A request may leave `model` out, or name the served version (`tiny:v3`) or its registered model (`tiny`)."""
    if request.model is not None and request.model not in (model_id, model_id.split(":")[0]):
        raise RequestError(404, f"The model {request.model!r} does not exist on this endpoint; it serves "
                                f"{model_id!r} (GET /v1/models)", param="model", code="model_not_found")


def _complete(loaded: LoadedModel, request: CompletionRequest) -> dict:
    import torch

    prompt_ids = loaded.tokenizer.encode(request.prompt).ids
    if not prompt_ids:
        raise RequestError(400, "prompt: encodes to no tokens", param="prompt")
    # The model attends to its last block_size tokens; generate() crops the context itself.
    idx = torch.tensor(prompt_ids, dtype=torch.long)[None, :]  # (1, P)
    generator = torch.Generator().manual_seed(request.seed) if request.seed is not None else None
    out = loaded.model.generate(idx, request.max_tokens, temperature=request.temperature, top_k=request.top_k,
                                eos_id=EOT_ID, generator=generator)
    new_ids = out[0, idx.shape[1]:].tolist()
    stopped = EOT_ID in new_ids
    if stopped:
        new_ids = new_ids[: new_ids.index(EOT_ID)]
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": loaded.model_id,
        "choices": [{"text": loaded.tokenizer.decode(new_ids), "index": 0, "logprobs": None,
                     "finish_reason": "stop" if stopped else "length"}],
        "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(new_ids),
                  "total_tokens": len(prompt_ids) + len(new_ids)},
    }


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
        limits = {"max_prompt_chars": cfg.max_prompt_chars, "max_tokens_cap": cfg.max_tokens_cap}
        app = _deployment().options(ray_actor_options={"num_cpus": cfg.num_cpus}).bind(loader, limits)
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


class ServeError(RuntimeError):
    """The endpoint cannot start for a reason the user can fix (a busy port)."""


def _check_port_free(host: str, port: int) -> None:
    # Serve's proxy would fail to bind in the background and leave us waiting for /healthz.
    with socket.socket() as s:
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

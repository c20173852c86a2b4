"""The Ray Serve application: an OpenAI-style completions endpoint for the champion.

The deployment takes its model loader as an argument (house style 7): the CLI
hands it `RegistryLoader` (download `models:/NAME@champion`, check sha256,
load), tests may hand it `FolderLoader` on a model folder they made.

Endpoints: `POST /v1/completions`, `GET /v1/models`, `GET /healthz`.
Every request is validated; bad input gets a 4xx with a message, never a 5xx.
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

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict

from components.config import ServeConfig

APP_NAME = "gptforge"
EOT_ID = 0  # components.data.EOT is id 0 in every tokenizer gptforge trains


@dataclass
class LoadedModel:
    model: object  # a GPT or a quantized GPT: has .generate and .config
    tokenizer: object  # tokenizers.Tokenizer
    model_id: str  # what /v1/models and responses call it, e.g. "tiny:v3"


@dataclass(frozen=True)
class FolderLoader:
    """Load a candidate folder (model.safetensors + config.json + tokenizer.json + checksums.json)."""

    folder: str
    model_id: str = "local"

    def __call__(self) -> LoadedModel:
        from tokenizers import Tokenizer

        from components.files import verify_checksums
        from components.quantize import load_variant

        verify_checksums(self.folder)
        return LoadedModel(load_variant(self.folder), Tokenizer.from_file(f"{self.folder}/tokenizer.json"),
                           self.model_id)


@dataclass(frozen=True)
class RegistryLoader:
    """Load the version an alias of a registered model points at (by default `champion`).

    Files are downloaded once per version into `cache_dir/<name>-v<version>` and
    checked against their sha256 at every load.
    """

    tracking_uri: str
    model_name: str
    cache_dir: str
    alias: str = "champion"

    def __call__(self) -> LoadedModel:
        from components.files import CHECKSUMS_FILE
        from pipelines.tracking import download_version, find_alias

        version = find_alias(self.tracking_uri, self.model_name, self.alias)
        target = Path(self.cache_dir) / f"{self.model_name}-v{version.version}"
        if not (target / CHECKSUMS_FILE).exists():
            staging = target.with_name(target.name + ".download")
            shutil.rmtree(staging, ignore_errors=True)
            folder = download_version(self.tracking_uri, version, str(staging))
            shutil.rmtree(target, ignore_errors=True)
            os.replace(folder, target)  # a complete folder or none under the final name
            shutil.rmtree(staging, ignore_errors=True)
        return FolderLoader(str(target), f"{self.model_name}:v{version.version}")()


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
    if not 0.0 <= request.temperature <= 2.0:
        problems.append(f"temperature: must be between 0 and 2, got {request.temperature}")
    if request.top_k is not None and request.top_k < 1:
        problems.append(f"top_k: must be at least 1, got {request.top_k}")
    if request.n != 1:
        problems.append("n: only n=1 is supported")
    if request.stream:
        problems.append("stream: streaming is not supported yet; send stream=false")
    if problems:
        raise HTTPException(status_code=400, detail="; ".join(problems))


def _complete(loaded: LoadedModel, request: CompletionRequest) -> dict:
    import torch

    prompt_ids = loaded.tokenizer.encode(request.prompt).ids
    if not prompt_ids:
        raise HTTPException(status_code=400, detail="prompt: encodes to no tokens")
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

    Ray must be initialised. Raises TimeoutError if /healthz does not answer in time.
    """
    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    _check_port_free(cfg.host, cfg.port)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    limits = {"max_prompt_chars": cfg.max_prompt_chars, "max_tokens_cap": cfg.max_tokens_cap}
    app = _deployment().options(ray_actor_options={"num_cpus": cfg.num_cpus}).bind(loader, limits)
    serve.run(app, name=APP_NAME, route_prefix="/")
    url = f"http://{cfg.host}:{cfg.port}"
    _wait_healthy(url, timeout_s)
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


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
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

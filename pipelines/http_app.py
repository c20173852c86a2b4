"""The HTTP side of the endpoint: an OpenAI-compatible completions API on FastAPI.

Endpoints: `POST /v1/completions` (OpenAI's fields, streaming as server-sent
events; `components/completions.py` says which fields do what), `POST /v1/chat/completions`
(the messages rendered with the model's chat template, then the same engine path;
`components/chat_completions.py`), `GET /v1/models`, `GET /healthz`. Every request is
validated; bad input gets a 4xx in OpenAI's error shape
(`{"error": {"message", "type", "param", "code"}}`), never a 5xx.

Inside a replica: requests are tokenized and queued; one thread runs them in
batches on one KV cache: static batches (`serve.batching: static`, `components/batching.py`,
`components/generation.py`) or iteration-level ones that rows join and leave at every step
(`continuous`, `components/continuous.py`). A client that disconnects mid-stream cancels its rows.
A full queue answers 503 with Retry-After at once. With a `RegistryLoader`, a
thread polls the registry alias; when it moves (a pipeline run, `gptforge
promote`, `--rollback`) the new version is loaded beside the old one and then
swapped in with one assignment: queued and running requests finish on the model
they were admitted with, new ones get the new one. Every answer names the model
version that produced it (`model` and the `x-gptforge-model-version` header).

`pipelines/serving.py` mounts `api` on the Ray Serve deployment, whose endpoint
methods call `healthz`, `models`, `complete` and `chat_complete` here with the replica's `Engine`;
`standalone_app` puts the same endpoints on a plain FastAPI app for one `Engine`, which
any ASGI server (uvicorn) runs without Ray. Both publish the request bodies' JSON schemas
at `/openapi.json`, so schema-driven clients and fuzzers know every field.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from components import chat_completions as chat_shapes
from components import completions as api_shapes
from components.completions import RequestError
from components.config import ServeConfig
from pipelines.model_loading import FolderLoader, LoadedModel, RegistryLoader

VERSION_HEADER = "x-gptforge-model-version"
REPLICA_HEADER = "x-gptforge-replica"  # which replica answered (with several, HAProxy spreads the requests)


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content=error.body(), headers=error.headers)


async def _request_error(request: Request, error: RequestError):
    return _error_response(error)


async def _validation_error(request: Request, error: RequestValidationError):
    problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
    return _error_response(RequestError(400, "; ".join(problems)))


async def _http_error(request: Request, error: StarletteHTTPException):
    # Unknown paths (404) and wrong methods (405), in the same shape.
    return _error_response(RequestError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                        headers=dict(error.headers or {})))


async def _bug(request: Request, error: Exception):
    logging.getLogger(__name__).exception("unexpected error answering %s", request.url.path)
    return _error_response(RequestError(500, f"internal error ({type(error).__name__}); see the replica's log",
                                        error_type="server_error"))


_BODIES = {"/v1/completions": api_shapes.CompletionRequest, "/v1/chat/completions": chat_shapes.ChatCompletionRequest}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, plus the request bodies: the endpoint reads them itself (to cap their size
    first), so FastAPI cannot see their fields."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        for path, model in _BODIES.items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(body.pop("$defs", {}))
            schema["components"]["schemas"][model.__name__] = body
            post = schema.get("paths", {}).get(path, {}).get("post")
            if post is not None:
                post["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


def _new_app() -> FastAPI:
    """An app that answers every error in OpenAI's shape and publishes the completions body's schema."""
    app = FastAPI(title="gptforge", description="OpenAI-compatible completions from the gptforge champion")
    app.add_exception_handler(RequestError, _request_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _bug)
    app.openapi = functools.partial(_openapi, app)
    return app


api = _new_app()


class _Reply:
    """One request's side of the batch loop: deltas from the batch thread, read on the event loop.

    A streamed request wakes the event loop for every delta; any other request only once per
    choice, when it has finished (its deltas are gathered on the batch thread meanwhile), so
    a plain completion costs the loop one wake-up, not one per token.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, choices: int, stream: bool):
        self.loop, self.queue, self.open, self.stream = loop, asyncio.Queue(), choices, stream
        self.rows: list = []  # the request's rows, to stop when nobody waits for them any more

    def cancel(self) -> None:
        """The client went away: its rows stop at the next step (and free their slots)."""
        for row in self.rows:
            row.cancelled = True

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
    """The replica's model, its batching loop, and the registry watcher that swaps models.

    `cfg` is the experiment's `serve:` section: the request limits, the batching and the polling.
    """

    def __init__(self, loader, cfg: ServeConfig, device: str, replica: str):
        from components.batching import Batcher
        from components.continuous import ContinuousBatcher, ContinuousEngine
        from components.generation import batch_fits

        self.loader, self.cfg, self.device, self.replica = loader, cfg, device, replica
        self.current: LoadedModel = loader(device) if _takes_device(loader) else loader()
        self.created = int(time.time())
        if cfg.batching == "continuous":
            # Slots for the largest request too: it runs alone when it is larger than max_batch_size.
            slots = max(cfg.max_batch_size, cfg.max_choices)
            if device == "cpu":
                from components.decode_attention import prepare

                prepare()  # compile the CPU decode attention kernel before the first request, not during it
            self.batcher = ContinuousBatcher(
                lambda loaded: ContinuousEngine(loaded.model, loaded.text, loaded.eot_id, slots), cfg)
        else:
            self.batcher = Batcher(self._run_batch, cfg,
                                   fits=lambda loaded, rows: batch_fits(rows, loaded.model.config.block_size))
        self._stop = threading.Event()
        if cfg.poll_interval_s and hasattr(loader, "current_version"):
            threading.Thread(target=self._watch, args=(cfg.poll_interval_s,), name="gptforge-registry-watch",
                             daemon=True).start()

    def _run_batch(self, loaded: LoadedModel, works: list) -> None:
        from components.generation import generate_batch

        generate_batch(loaded.model, loaded.text, [row for w in works for row in w.rows], loaded.eot_id)

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


# ------------------------------------------------------------------ endpoints


def healthz(engine: Engine) -> JSONResponse:
    """`GET /healthz`: the model served and the completions queued."""
    loaded = engine.current
    return JSONResponse({"status": "ok", "model": loaded.model_id, "queued": engine.batcher.queued_rows()},
                        headers={VERSION_HEADER: loaded.model_id})


def models(engine: Engine) -> JSONResponse:
    """`GET /v1/models`: the one model served, in OpenAI's list shape."""
    loaded = engine.current
    return JSONResponse({"object": "list", "data": [loaded.describe(engine.created)]},
                        headers={VERSION_HEADER: loaded.model_id})


async def complete(engine: Engine, request: Request):
    """`POST /v1/completions`: validate, queue the rows, answer at once or as server-sent events."""
    received = time.monotonic()
    body = await _read_body(request, engine.cfg.max_body_bytes)
    req = api_shapes.parse_request(body, engine.cfg)
    loaded = engine.current  # this request runs on this model, even if another is swapped in meanwhile
    api_shapes.check_model(req, loaded.model_id)
    sampling = api_shapes.sampling_of(req)
    prompts = req.prompts
    ids = [loaded.tokenizer.encode(p).ids for p in prompts]
    api_shapes.check_context([len(i) for i in ids], sampling.max_tokens, loaded.model.config.block_size,
                             isinstance(req.prompt, str))
    answer = api_shapes.Answer(loaded.model_id, req.logprobs is not None)
    return await _generate(engine, loaded, req, prompts, ids, sampling, answer, received)


async def chat_complete(engine: Engine, request: Request):
    """`POST /v1/chat/completions`: the messages rendered with the model's chat template, then as `complete`."""
    received = time.monotonic()
    body = await _read_body(request, engine.cfg.max_body_bytes)
    req = chat_shapes.parse_chat_request(body, engine.cfg)
    loaded = engine.current
    api_shapes.check_model(req, loaded.model_id)
    prompt, ids, sampling = chat_shapes.chat_prompt(req, loaded.chat_template, loaded.tokenizer,
                                                    loaded.model.config.block_size, engine.cfg)
    answer = chat_shapes.ChatAnswer(loaded.model_id, bool(req.logprobs))
    return await _generate(engine, loaded, req, [prompt], [ids], sampling, answer, received)


async def _generate(engine: Engine, loaded: LoadedModel, req, prompts: list[str], ids: list[list[int]], sampling,
                    answer: api_shapes.Answer, received: float):
    """Queue the rows of a checked request (`req.n` of each prompt), answer at once or as server-sent events."""
    import torch

    from components.batching import Overloaded, Work
    from components.rows import Row

    n = req.choices_per_prompt
    reply = _Reply(asyncio.get_running_loop(), len(prompts) * n, bool(req.stream))
    # One generator per request, drawn from in row order: a seed gives the same choices every time.
    generator = torch.Generator().manual_seed(req.seed if req.seed is not None else
                                              int.from_bytes(os.urandom(8), "little") >> 1)
    fail = reply.fail  # the same for all the request's rows: when one fails, they stop together
    rows = [Row(ids[p], prompts[p], sampling, reply.emitter(p * n + j), generator, fail)
            for p in range(len(prompts)) for j in range(n)]
    reply.rows = rows
    work = Work(rows, loaded, fail)
    try:
        engine.batcher.submit(work)
    except Overloaded as error:
        raise RequestError(503, str(error), code="overloaded", error_type="server_overloaded",
                           headers={"Retry-After": str(error.retry_after_s)}) from None
    prompt_tokens = sum(len(i) for i in ids)
    headers = {VERSION_HEADER: loaded.model_id, REPLICA_HEADER: engine.replica}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_events(reply, answer, len(rows), include_usage, prompt_tokens),
                                 media_type="text/event-stream", headers=headers)
    choices: list[list] = [[] for _ in rows]
    try:
        async for index, delta in reply.deltas():
            choices[index].append(delta)
    except asyncio.CancelledError:  # the server gave up on the request (its client went away)
        reply.cancel()
        raise
    generated = time.monotonic()
    content = answer.body(choices, prompt_tokens)
    headers["Server-Timing"] = _server_timing(received, work, generated)
    return JSONResponse(content, headers=headers)


def standalone_app(engine: Engine) -> FastAPI:
    """The endpoints of one `engine` on a FastAPI app of their own: the endpoint without Ray Serve.

    Any ASGI server runs it (`uvicorn.run(standalone_app(engine), host="127.0.0.1")`); it answers
    as the Serve deployment does, since both call the same functions.
    """
    app = _new_app()

    @app.get("/healthz")
    def _healthz():
        return healthz(engine)

    @app.get("/v1/models")
    def _models():
        return models(engine)

    @app.post("/v1/completions")
    async def _completions(request: Request):
        return await complete(engine, request)

    @app.post("/v1/chat/completions")
    async def _chat_completions(request: Request):
        return await chat_complete(engine, request)

    return app


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


async def _events(reply: _Reply, answer: api_shapes.Answer, choices: int, include_usage: bool, prompt_tokens: int):
    """Server-sent events in OpenAI's chunk format (`answer`'s), then `data: [DONE]`."""
    completion_tokens = 0
    try:
        for chunk in answer.opening(choices):
            yield f"data: {json.dumps(chunk)}\n\n"
        async for index, delta in reply.deltas():
            completion_tokens += delta.completion_tokens
            for chunk in answer.chunks(index, delta):
                yield f"data: {json.dumps(chunk)}\n\n"
    except Exception as error:  # noqa: BLE001 - the status line is sent already: report in the stream
        logging.getLogger(__name__).exception("a streamed completion failed")
        yield f"data: {json.dumps(RequestError(500, f'internal error ({type(error).__name__})', error_type='server_error').body())}\n\n"
    finally:  # a client that disconnects mid-stream closes this generator: its rows stop at the next step
        reply.cancel()
    if include_usage:
        yield f"data: {json.dumps(answer.usage_chunk(prompt_tokens, completion_tokens))}\n\n"
    yield "data: [DONE]\n\n"

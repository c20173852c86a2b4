"""Plain helpers the tests share: repository paths, fast CLI overrides, running the real `gptforge` CLI,
free ports, real candidate folders, a real `mlflow server`, a real uvicorn server, and learnable token rows."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
TINY_EXPERIMENT = REPO / "experiments" / "tiny.yaml"

# Small enough for a 2-core CI machine, big enough that every stage does real work.
FAST_OVERRIDES = [
    "data.max_bytes=400000",
    "tokenizer.vocab_size=1024",
    "pretrain.max_steps=30",
    "pretrain.log_every=5",
    "finetune.max_pairs=600",
    "finetune.max_steps=10",
    "finetune.log_every=5",
    "evaluate.max_batches=4",
    "evaluate.gen_tokens=8",
]

# Smaller still: every stage does real work, but only a few steps of it (runs through Ray jobs and clusters).
JOB_OVERRIDES = [*FAST_OVERRIDES, "pretrain.max_steps=6", "pretrain.log_every=2", "pretrain.eval_every=0",
                 "finetune.max_steps=3", "finetune.log_every=1", "finetune.eval_every=0", "quantize.variants=[fp32]",
                 "evaluate.max_batches=2", "evaluate.num_samples=1"]

# The shape of the token rows `write_rows` makes: ids below VOCAB, BLOCK + 1 tokens a row.
VOCAB, BLOCK = 64, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", *args]


def cli_env(extra: dict | None = None) -> dict:
    """The environment for a CLI run: MLflow on its default local store and an embedded Ray, unless `extra` says otherwise."""
    return {**{k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}, **(extra or {})}


def gptforge(*args: str, cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process and wait for it."""
    return subprocess.run(cli_command(*args), cwd=cwd, env=cli_env(env), capture_output=True, text=True,
                          timeout=timeout)


def make_candidate(folder: Path, variant: str = "fp32", seed: int = 0) -> str:
    """A real candidate folder as the quantize stage writes it (tiny GPT, trained tokenizer, checksums.json).

    Returns the sha256 of its checksums.json (what promotion pins in the registry).
    """
    from components.files import write_checksums
    from components.model import GPT, GPTConfig, save_model
    from components.quantize import quantize_model
    from components.tokenizer import TOKENIZER_FILE, train_tokenizer

    torch.manual_seed(seed)
    src = folder.with_name(folder.name + "-fp32-src")
    save_model(GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=16)), str(src))
    train_tokenizer(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300).save(str(src / TOKENIZER_FILE))
    quantize_model(str(src), variant, str(folder))
    return write_checksums(folder)


def heldout_data(folder: Path, fingerprint: str = "fp-1", tokenizer_texts: tuple[str, ...] = ("def add(a, b):\n",),
                 texts: tuple[str, ...] = ("def mul(a, b):\n    return a * b\n", "print('héllo')\n")):
    """A real data stage record of held-out data only: tokenizer.json, heldout_text.jsonl and sft_heldout.parquet."""
    import pyarrow as pa

    from components.artifacts import TokenizedData
    from components.heldout_text import HELDOUT_TEXT_FILE, write_heldout_text
    from components.packing import write_rows
    from components.sft import Pair, tokenize_pairs
    from components.tokenizer import TOKENIZER_FILE, train_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(list(tokenizer_texts) * 20, vocab_size=300)
    tokenizer.save(str(folder / TOKENIZER_FILE))
    write_heldout_text(str(folder), pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": list(texts)}))
    tokens, mask = tokenize_pairs([Pair("def sub(a, b):\n", "    return a - b\n", "p")], tokenizer, 32)
    write_rows(folder / "sft_heldout.parquet", tokens, mask)
    return TokenizedData(root=str(folder), train_uri="", val_uri="", sft_train_uri="",
                         sft_heldout_uri=str(folder / "sft_heldout.parquet"), tokenizer_uri=str(folder / TOKENIZER_FILE),
                         manifest_uri="", fingerprint=fingerprint, vocab_size=300, block_size=32,
                         heldout_text_uri=str(folder / HELDOUT_TEXT_FILE))


def promote_candidates(tracker, cfg, tmp_path, ppl_by_variant, tag=True, before_promote=lambda: None, seed=0,
                       data=None, metrics=None, suite=None):
    """Candidate runs as the pipeline makes them (real folders, tagged, uploaded, bits per byte measured on
    `data`'s held-out text, by default `heldout_data(tmp_path / "data")`, and on the evaluation `suite`,
    by default `data`'s own folder read as one), then the promote stage.

    `metrics` (variant -> {name: value}) replaces measured values, to stand in for a candidate that
    evaluated that way."""
    from tokenizers import Tokenizer

    from components.bpb import bpb_metrics, suite_bpb_metrics
    from components.suite import Suite
    from components.artifacts import EvalReport
    from components.quantize import load_variant
    from components.tokenizer import TOKENIZER_FILE
    from pipelines import promotion
    from pipelines.registry import CHECKSUMS_TAG

    data = data or heldout_data(tmp_path / "data")
    suite = suite or Suite(data.root, f"suite-{data.fingerprint}")
    reports, runs = [], {}
    with tracker.run(f"{cfg.name}-pipeline") as parent:
        for variant, ppl in ppl_by_variant.items():
            folder = tmp_path / f"{parent.run_id}-{variant}"
            run = tracker.open_run(f"candidate-{variant}", parent, stage="candidate")
            pin = make_candidate(folder, variant, seed)
            if tag:
                run.set_tags({CHECKSUMS_TAG: pin})
            run.log_artifacts(str(folder), promotion.MODEL_ARTIFACT)
            model, tokenizer = load_variant(str(folder)), Tokenizer.from_file(str(folder / TOKENIZER_FILE))
            measured = bpb_metrics(model, tokenizer, data, cfg.evaluate)
            measured |= suite_bpb_metrics(model, tokenizer, suite.view(data), cfg.evaluate)
            values = {**measured, "eval/val_ppl": ppl, "model/size_bytes": float((folder / "model.safetensors")
                                                                                .stat().st_size),
                      **(metrics or {}).get(variant, {})}
            run.log_metrics(values)
            tracker.close_run(run)
            runs[variant] = run
            reports.append(EvalReport(variant, values))
        with tracker.run("promote", parent, stage="promote") as log:
            before_promote()
            return promotion.promote(tracker, cfg, reports, runs, data, log, parent, suite)


@contextlib.contextmanager
def uvicorn_server(app):
    """Serve the ASGI `app` with a real uvicorn on a free 127.0.0.1 port, in a thread; yields its base URL."""
    import threading
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def write_rows(path, n, seed):
    """`n` token rows of BLOCK + 1 ids that count upward from a random start (learnable), as parquet at `path`."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = (rng.integers(0, VOCAB, size=(n, 1)) + np.arange(BLOCK + 1)) % VOCAB
    pq.write_table(pa.table({"tokens": pa.array(rows.astype(np.int32).tolist(), pa.list_(pa.int32()))}), path)
    return str(path)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend (`db`) and proxied artifacts
    (stored at `artifacts`: a folder by default, or an `s3://` URI with `env` pointing at the
    S3 server); on `port` when given (a client may already be trying it). `args` go on its
    command line (`--app-name basic-auth`), `env` into its environment; it runs in `tmp_path`."""

    def __init__(self, tmp_path: Path, port: int | None = None, args: tuple[str, ...] = (), env: dict | None = None,
                 artifacts: str | None = None):
        import time
        import urllib.request

        self.db = tmp_path / "server.db"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "mlflow-server.log"
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", artifacts or str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1", *args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp_path,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 180  # slow on a loaded 2-core machine
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mlflow server did not start: {self.log_path.read_text()}")
                time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server (and its workers); safe to call twice."""
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server runs uvicorn/gunicorn workers in its group
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()


def stage_runs(uri: str, parent_id: str, experiment: str = "tiny") -> dict:
    """The stage runs of one pipeline run, by stage name (`gptforge.stage`)."""
    from mlflow import MlflowClient

    from pipelines.tracking import PARENT_TAG, STAGE_TAG

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return {r.data.tags[STAGE_TAG]: r for r in runs}


def run_id_of(output: str) -> str:
    """The pipeline run id a `gptforge run`/`submit` printed."""
    import re

    return re.search(r"MLflow run: ([0-9a-f]{32})", output).group(1)

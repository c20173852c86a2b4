"""Shared fixtures: a tiny GPT, free ports, and running the real `gptforge` CLI."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gptforge(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the installed CLI in a fresh process, with MLflow on its default local store."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def tiny_gpt():
    from components.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=8))


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, with the reason shown, where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

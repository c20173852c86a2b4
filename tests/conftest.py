"""Shared fixtures: a tiny GPT, a module-wide local Ray, and a real `mlflow server`.

Plain helpers (paths, CLI runners, candidate folders) live in tests/helpers.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import MlflowServer

# Ray starts a fresh local instance when a Ray API is called without ray.init. In a test
# process that shuts Ray down between modules, a stray call from a background thread would
# start one behind the tests' back, and its later death ends pytest with status 1 and no
# summary. Every test here initialises Ray explicitly; set before anything imports ray.
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip, with the reason shown, where CUDA is not available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")  # a frozen dataclass: safe to share, and module-scoped fixtures can use it
def tiny_config():
    """The smallest GPT shape the tests use: 2 layers, 2 heads, 16-wide, a 64-token vocabulary and context 16."""
    from components.model import GPTConfig

    return GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def tiny_model(tiny_config):
    """A GPT of `tiny_config` with seed-0 weights, so every test gets the same numbers."""
    from components.model import GPT

    torch.manual_seed(0)
    return GPT(tiny_config)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 4 CPUs for the whole module, shut down after its last test."""
    from pipelines import ray_runtime  # imported here so that modules without Ray never load it

    ray_runtime.init_ray(num_cpus=4)
    yield
    ray_runtime.shutdown_ray()


@pytest.fixture
def mlflow_server_process(tmp_path):
    """A real `mlflow server` that a test may stop part-way (`.stop()`); stopped after the test anyway."""
    server = MlflowServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mlflow_server(mlflow_server_process):
    """The URL of a real `mlflow server` on 127.0.0.1; stopped after the test."""
    return mlflow_server_process.url

"""The chat path end to end: the tiny pipeline fine-tunes on chat data built from the stdlib (real CLI, real
Ray, MLflow SQLite), the champion comes from the registry with its chat template, and the official `openai`
client talks to it through /v1/chat/completions (the standalone app under a real uvicorn)."""
import openai
import pytest
import torch
from mlflow import MlflowClient

from components.config import ServeConfig
from pipelines import http_app
from pipelines.model_loading import RegistryLoader
from tests.helpers import JOB_OVERRIDES, TINY_EXPERIMENT, gptforge, uvicorn_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # one pipeline run: ~2-3 minutes on 2 cores


def test_a_chat_fine_tune_is_served_on_the_chat_route(tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    run = gptforge("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, f"workdir={workdir}", "finetune.format=chat",
                   cwd=workdir)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    uri = f"sqlite:///{workdir}/mlflow.db"
    data_run = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("tiny").experiment_id], "tags.`gptforge.stage` = 'prepare_data'")[0]
    assert data_run.data.metrics["data/sft_train_pairs"] > 0  # conversations, rendered with the template

    loader = RegistryLoader(uri, "tiny", str(tmp_path / "cache")).fetch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = http_app.Engine(loader, ServeConfig(), "cpu", "e2e")
    try:
        assert engine.current.chat_template and "<|im_start|>" in engine.current.chat_template
        with uvicorn_server(http_app.standalone_app(engine)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
            messages = [{"role": "user", "content": 'def add(a, b):\n    """Return a plus b."""'}]
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
            assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 12
            streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
                model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True) if chunk.choices)
            assert streamed == reply.choices[0].message.content
    finally:
        engine.stop()
        torch.set_num_threads(threads)

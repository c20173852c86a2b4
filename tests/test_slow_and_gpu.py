"""The default experiment exactly as a user runs it, and the GPU path.

Deselected by default (see pyproject.toml). Run with:
    ./scripts/test -m slow        # the full tiny experiment, 4-6 minutes on 2 cores
    ./scripts/test -m gpu         # on a machine with a CUDA GPU
"""
import pytest
from mlflow import MlflowClient

from tests.helpers import FAST_OVERRIDES, TINY_EXPERIMENT, gptforge


@pytest.mark.slow
@pytest.mark.integration
def test_default_tiny_experiment_end_to_end(tmp_path):
    result = gptforge("run", str(TINY_EXPERIMENT), f"workdir={tmp_path}", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "step   200/200" in result.stdout and "step   100/100" in result.stdout
    assert "<- champion" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_model_version_by_alias("tiny", "champion") is not None
    _readme_example_returns_text(tmp_path)


def _readme_example_returns_text(workdir):
    """The README's curl example, against the champion of the default run, gives a non-empty completion."""
    import json
    import urllib.request

    from components.config import ServeConfig
    from pipelines import ray_runtime, serving
    from pipelines.model_loading import RegistryLoader
    from tests.helpers import free_port

    ray_runtime.init_ray(2)
    try:
        loader = RegistryLoader(f"sqlite:///{workdir}/mlflow.db", "tiny", str(workdir / "serving"))
        url = serving.deploy(loader, ServeConfig(port=free_port()), timeout_s=300)
        body = {"prompt": "def add(a, b):\n", "max_tokens": 32, "temperature": 0}  # as in the README
        request = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            text = json.loads(response.read())["choices"][0]["text"]
        assert text.strip(), f"the README's example returned {text!r}"
    finally:
        serving.shutdown()
        ray_runtime.shutdown_ray()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_trains_on_one_gpu(tmp_path):
    variants = "quantize.variants=[fp32,bf16,int8_dynamic,int8_weight_only,int4_weight_only]"
    result = gptforge("run", str(TINY_EXPERIMENT), *FAST_OVERRIDES, f"workdir={tmp_path}", variants,
                      "pretrain.use_gpu=true", "pretrain.num_workers=1", "finetune.use_gpu=true",
                      "pretrain.compile=true", "pretrain.log_every=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "<- champion" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id], "tags.`gptforge.stage` = 'candidate'")
    on_cuda = {r.data.tags["candidate.variant"]: r.data.metrics["eval/on_cuda"] for r in runs}
    # evaluate.device=auto: every variant that runs on CUDA is measured there; int8_dynamic stays on the CPU
    assert on_cuda == {"fp32": 1.0, "bf16": 1.0, "int8_dynamic": 0.0, "int8_weight_only": 1.0, "int4_weight_only": 1.0}


@pytest.mark.gpu
def test_bf16_compiled_loop_on_the_gpu_reports_mfu_and_memory():
    import torch

    from components import devices, parallel
    from components.model import GPT, GPTConfig, flops_per_token
    from components.config import TrainingConfig
    from components.train import Hooks, repeat, train

    device = torch.device("cuda", 0)
    devices.configure_device(device)
    cfg = GPTConfig(block_size=256, vocab_size=1024, n_layer=4, n_head=4, n_embd=256)
    rows = (torch.randint(0, 1024, (64, 1)) + torch.arange(257)) % 1024  # learnable: counts upward
    batches = repeat(lambda epoch: ({"tokens": rows[i:i + 16]} for i in range(0, 64, 16)))
    precision = devices.resolve_precision("auto", device)
    assert precision.name == "bf16"
    torch.manual_seed(0)
    model = parallel.parallelize(GPT(cfg), "ddp", device, precision, compile=True)
    logs = []
    train(model, batches, TrainingConfig(max_steps=60, lr=3e-3, min_lr=3e-4, warmup_steps=5, weight_decay=0.1,
                                         grad_clip=1.0, log_every=20, eval_every=0, checkpoint_every=0),
          Hooks(log=lambda m, s: logs.append(m)), device, precision, flops_per_token=flops_per_token(cfg),
          peak_flops=devices.peak_flops(device))
    assert logs[-1]["train/loss"] < logs[0]["train/loss"] - 1.0
    assert logs[-1]["train/peak_memory_bytes"] > 0
    if devices.peak_flops(device):  # a GPU in the peak table
        assert 0 < logs[-1]["train/mfu"] < 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_the_continuous_engine_runs_on_the_gpu_in_the_candidates_dtype(dtype_name):
    """The endpoint's engine (and `generate`, which evaluation times) on CUDA, its cache in the weights' dtype."""
    import torch

    from components.continuous import ContinuousEngine
    from components.generation import generate, generate_batch
    from components.model import GPT, GPTConfig
    from components.rows import Row, Sampling, TokenText
    from components.tokenizer import EOT_ID, train_tokenizer

    dtype = getattr(torch, dtype_name)
    tokenizer = train_tokenizer(["def add(a, b):\n    return a + b\n", "x = [1, 2, 3]\nprint(x)\n"] * 20,
                                vocab_size=300)
    text = TokenText(tokenizer, 300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=2, n_embd=64)).to("cuda", dtype).eval()
    engine = ContinuousEngine(model, text, EOT_ID, slots=4, max_step_tokens=8)
    assert engine.cache.k[0].is_cuda and engine.cache.k[0].dtype == dtype
    prompts, outs = ["def add(a, b):\n", "x = [1, 2, 3]\nprint(x)\n", "print"], [[], [], []]
    rows = [Row(tokenizer.encode(p).ids, p, Sampling(max_tokens=10, temperature=0), o.append)
            for p, o in zip(prompts, outs)]
    engine.step(rows[:1])
    engine.step(rows[1:])  # joins while the first decodes; the longer prompt prefills in chunks of the budget
    while engine.running():
        engine.step()
    assert all(o and o[-1].finish_reason for o in outs)
    if dtype == torch.float32:  # the static engine on the same GPU gives the same greedy text
        static = [[], [], []]
        generate_batch(model, text, [Row(r.prompt_ids, r.prompt_text, r.sampling, o.append)
                                     for r, o in zip(rows, static)], EOT_ID)
        assert ["".join(d.text for d in o) for o in outs] == ["".join(d.text for d in o) for o in static]
    idx = torch.tensor([tokenizer.encode("def add").ids], device="cuda")
    out = generate(model, idx, 8, temperature=0.0, text=text)
    assert out.is_cuda and out.shape == (1, idx.size(1) + 8)

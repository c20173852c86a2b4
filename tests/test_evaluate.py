"""Candidate evaluation, comparison and skipping, on real files, real torch and a real MLflow SQLite store."""
import csv
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient

from components import comparison
from components.artifacts import EvalReport, QuantizedModel, TokenizedData
from components.config import EvaluateConfig
from components.evaluate import (
    CANDIDATE_METRICS,
    DELTA_METRICS,
    add_deltas,
    evaluate,
    generation_metrics,
    mean_loss,
)
from components.experiment_file import load_config
from components.generation import generate
from components.model import GPT, GPTConfig, save_model
from components.packing import pack_rows
from components.quantize import RUNS_ON, VARIANTS, load_variant, quantize_model, stored_bytes
from components.sft import Pair, tokenize_pairs
from components.tokenizer import train_tokenizer
from pipelines import candidates
from pipelines.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, Tracker

CPU_VARIANTS = [v for v in VARIANTS if "cpu" in RUNS_ON[v]]
BLOCK = 32
TEXT = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(200)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A trained tokenizer, packed validation rows and prompt/completion rows, as the data stage writes them."""
    root = tmp_path_factory.mktemp("data")
    tokenizer = train_tokenizer(TEXT, vocab_size=300)
    tokenizer.save(str(root / "tokenizer.json"))
    ids = [e.ids for e in tokenizer.encode_batch(TEXT, add_special_tokens=False)]
    rows = pack_rows(ids, BLOCK)[:40]
    pq.write_table(pa.table({"tokens": rows.tolist()}), root / "val.parquet")
    pairs = [Pair(f"def g{i}(x):\n", f"    return x + {i}\n", str(i)) for i in range(12)]
    tokens, mask = tokenize_pairs(pairs, tokenizer, BLOCK)
    pq.write_table(pa.table({"tokens": tokens.tolist(), "mask": mask.tolist()}), root / "heldout.parquet")
    torch.manual_seed(0)
    config = GPTConfig(block_size=BLOCK, vocab_size=tokenizer.get_vocab_size(), n_layer=2, n_head=2, n_embd=32)
    save_model(GPT(config), str(root / "fp32-src"))
    (root / "fp32-src" / "tokenizer.json").write_text((root / "tokenizer.json").read_text())
    return root


def _data(files) -> TokenizedData:
    """The data stage's record of the fixture's files (only what evaluation reads is real)."""
    return TokenizedData(root=str(files), train_uri="", val_uri=str(files / "val.parquet"), sft_train_uri="",
                         sft_heldout_uri=str(files / "heldout.parquet"), tokenizer_uri=str(files / "tokenizer.json"),
                         manifest_uri="", fingerprint="", vocab_size=300, block_size=BLOCK)


def _evaluate(files, folder, variant):
    cfg = EvaluateConfig(max_batches=0, batch_size=16, gen_tokens=6, num_samples=2, prompts=["def f3(x):\n", "return"])
    data = _data(files)
    return evaluate(load_variant(str(folder)), cfg, data, variant=variant, suite=data,  # its own held-out side as suite
                    size_bytes=(folder / "model.safetensors").stat().st_size, disk_bytes=stored_bytes(str(folder)))


def test_perplexity_is_exp_of_the_mean_loss_computed_independently(files):
    report = _evaluate(files, files / "fp32-src", "fp32")
    model = load_variant(str(files / "fp32-src"))
    tokens = torch.tensor(pq.read_table(files / "val.parquet").column("tokens").to_pylist())  # (40, BLOCK + 1)
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0]  # all 40 rows in one batch, not the evaluator's batches of 16
    targets = tokens[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)).item()
    accuracy = (logits.argmax(-1) == targets).float().mean().item()
    assert report.metrics["eval/val_loss"] == pytest.approx(loss, rel=1e-5)
    assert report.metrics["eval/val_ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
    assert report.metrics["eval/val_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_completion_loss_counts_only_completion_tokens(files):
    model = load_variant(str(files / "fp32-src"))
    table = pq.read_table(files / "heldout.parquet")
    rows = {name: np.array(table.column(name).to_pylist()) for name in ("tokens", "mask")}
    loss, _ = mean_loss(model, rows, batch_size=5)
    tokens, mask = torch.tensor(rows["tokens"]), torch.tensor(rows["mask"])
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0]
    keep = mask[:, 1:] == 1
    expected = F.cross_entropy(logits[keep], tokens[:, 1:][keep]).item()
    assert loss == pytest.approx(expected, rel=1e-5)


def test_every_cpu_variant_reports_every_metric_and_deltas_against_fp32(files, tmp_path):
    reports = []
    for variant in CPU_VARIANTS:
        quantize_model(str(files / "fp32-src"), variant, str(tmp_path / variant))
        reports.append(_evaluate(files, tmp_path / variant, variant))
    reports = add_deltas(reports)
    for r in reports:
        assert {k for k in r.metrics if not k.startswith("eval/task/")} == set(CANDIDATE_METRICS), r.variant
        assert r.metrics["eval/suite_bpb"] == r.metrics["eval/val_bpb"]  # the same text, read the same way
        assert all(math.isfinite(v) for v in r.metrics.values()), r.variant
        m = r.metrics
        assert m["eval/tokens_per_s"] > 0 and m["eval/tokens_per_s_batch8"] > 0
        assert 0 < m["eval/token_ms_p50"] <= m["eval/token_ms_p95"]
        assert m["eval/ttft_ms"] > 0 and m["eval/on_cuda"] == 0 and m["eval/cpu_threads"] >= 1
        assert m["eval/peak_mem_bytes"] >= sum(m[f"model/bytes_{d}"] for d in ("float32", "bfloat16", "float16", "int8"))
        assert set(r.generations) == {"def f3(x):\n", "return"} and len(r.samples) == 2
    fp32 = reports[0].metrics
    assert all(fp32[k] == (1.0 if k in ("eval/speedup", "model/size_ratio") else 0.0) for k in DELTA_METRICS)
    by_variant = {r.variant: r.metrics for r in reports}
    # per-variant quality tolerance against fp32 on a random 2-layer model: val perplexity within 1%
    # for fp16/bf16/int8 (ppl is ~vocab size here, so this is loose but catches a broken load)
    for variant, m in by_variant.items():
        assert abs(m["eval/val_ppl_delta_pct"]) < 1.0, variant
        assert m["model/size_ratio"] == pytest.approx(m["model/size_bytes"] / fp32["model/size_bytes"])
    assert by_variant["bf16"]["model/bytes_bfloat16"] > 0 and by_variant["bf16"]["model/bytes_float32"] == 0
    assert by_variant["int8_weight_only"]["model/disk_bytes_int8"] > 0


def test_generation_speed_uses_the_same_prompts_and_token_count(files, monkeypatch):
    model = load_variant(str(files / "fp32-src"))
    rows = np.array(pq.read_table(files / "val.parquet").column("tokens").to_pylist())
    seen = []

    def counting_generate(model, idx, n, **kwargs):
        out = generate(model, idx, n, **kwargs)
        seen.append((idx.shape, out.shape[1] - idx.shape[1]))
        return out

    monkeypatch.setattr("components.evaluate.generate", counting_generate)
    generation_metrics(model, rows, gen_tokens=5)
    timed = seen[2:]  # after the two warm-ups
    assert timed == [((1, 27), 5)] * 8 + [((8, 27), 5)]  # prompts of block 32 - 5 new tokens


def test_comparison_lists_every_candidate_with_every_metric(files, tmp_path):
    reports = []
    for variant in ("fp32", "int8_dynamic"):
        quantize_model(str(files / "fp32-src"), variant, str(tmp_path / variant))
        reports.append(_evaluate(files, tmp_path / variant, variant))
    reports = add_deltas(reports + [EvalReport("int4_weight_only", {}, skipped="needs CUDA")])
    paths = comparison.write_comparison(reports, str(tmp_path / "out"), winner="int8_dynamic")
    names = sorted(p.rsplit("/", 1)[1] for p in paths)
    assert names == sorted(["candidates.md", "candidates.csv", "generations.md", "quality_vs_size.png",
                            "quality_vs_speed.png"])
    table = (tmp_path / "out" / "candidates.md").read_text()
    assert "fp32 (ref)" in table and "int8_dynamic <- champion" in table
    assert "int4_weight_only" in table and "skipped: needs CUDA" in table
    for header, _, _ in comparison.COLUMNS:
        assert header in table.splitlines()[0]
    for line in table.splitlines()[2:4]:  # the measured rows: a value in every column
        assert all(cell.strip() not in ("", "-") for cell in line.strip("|").split("|")), line
    with open(tmp_path / "out" / "candidates.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["candidate"] for r in rows] == ["fp32", "int8_dynamic", "int4_weight_only"]
    for r in rows[:2]:
        assert all(r[k] != "" for k in CANDIDATE_METRICS), r["candidate"]
    for plot in ("quality_vs_size.png", "quality_vs_speed.png"):
        assert (tmp_path / "out" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    measured = reports[:2]
    for key in ("model/size_bytes", "eval/tokens_per_s"):
        ax = comparison.quality_figure(measured, key, key).axes[0]
        assert [t.get_text() for t in ax.texts] == ["fp32", "int8_dynamic"]  # a labelled point per candidate
        points = [tuple(c.get_offsets()[0]) for c in ax.collections]
        assert points == [(r.metrics[key], r.metrics["eval/val_ppl"]) for r in measured]
    generations = (tmp_path / "out" / "generations.md").read_text()
    assert generations.count("**fp32**") == 2 and generations.count("**int8_dynamic**") == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_variant_that_cannot_run_here_is_skipped_with_its_reason_logged(files, tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "skips", artifact_location=str(tmp_path / "art"))
    cfg = load_config(None, ["evaluate.device=cuda"])
    with tracker.run("parent") as parent:
        int4 = tracker.open_run("candidate-int4_weight_only", parent, stage="candidate")
        fp32 = tracker.open_run("candidate-fp32", parent, stage="candidate")
        # int4 cannot be built without CUDA: nothing written, the reason on its run
        built = candidates.quantize(_checkpoint(files), "int4_weight_only", str(tmp_path / "int4"), int4)
        assert "CUDA" in built.skipped and not (tmp_path / "int4").exists()
        assert candidates.evaluate(built, None, cfg, int4).skipped == built.skipped
        # fp32 is built, but evaluate.device=cuda cannot be honoured here
        report = candidates.evaluate(QuantizedModel("fp32", str(files / "fp32-src"), 0), None, cfg, fp32)
        assert "no CUDA GPU" in report.skipped and report.metrics == {}
        for run in (int4, fp32):
            tracker.close_run(run)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for run, reason in ((int4, built.skipped), (fp32, report.skipped)):
        tags = client.get_run(run.run_id).data.tags
        assert tags["candidate.status"] == "skipped" and tags["candidate.skip_reason"] == reason
    assert client.get_run(int4.run_id).data.tags["candidate.variant"] == "int4_weight_only"
    assert client.get_experiment_by_name("skips").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_every_candidate_skipped_is_an_error_naming_them(tmp_path):
    from components.experiment_file import ConfigError

    reports = [EvalReport("int4_weight_only", {}, skipped="needs CUDA")]
    with pytest.raises(ConfigError, match="int4_weight_only: needs CUDA"):
        candidates.compare(reports, {}, str(tmp_path), None, None)


def _checkpoint(files):
    from components.artifacts import Checkpoint

    return Checkpoint(uri=str(files / "fp32-src"), step=0)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["fp32", "bf16", "int8_weight_only"])
def test_evaluation_runs_on_the_gpu(files, tmp_path, variant):
    quantize_model(str(files / "fp32-src"), variant, str(tmp_path / variant))
    model = load_variant(str(tmp_path / variant), "cuda")
    cfg = EvaluateConfig(max_batches=0, gen_tokens=6, num_samples=1, prompts=["def f3(x):\n"])
    report = evaluate(model, cfg, _data(files), variant=variant, size_bytes=1,
                      disk_bytes=stored_bytes(str(tmp_path / variant)))
    m = report.metrics
    assert m["eval/on_cuda"] == 1.0 and m["eval/tokens_per_s"] > 0
    assert m["eval/peak_mem_bytes"] >= m["model/linear_bytes"]  # the weights live on the GPU
    cpu_cfg = EvaluateConfig(max_batches=0, gen_tokens=6, num_samples=1, prompts=[])
    cpu = evaluate(load_variant(str(files / "fp32-src")), cpu_cfg, _data(files), variant="fp32", size_bytes=1).metrics
    assert m["eval/val_ppl"] == pytest.approx(cpu["eval/val_ppl"], rel=0.02)  # same data, same metric, other device


def test_evaluation_samples_and_generations_are_what_the_endpoints_engine_answers(files):
    from tokenizers import Tokenizer

    from components.continuous import ContinuousEngine
    from components.rows import Row, Sampling, TokenText
    from components.tokenizer import EOT_ID

    model = load_variant(str(files / "fp32-src"))
    prompt = "def f3(x):\n"  # ends in "\n": the endpoint heals it, plain decoding would not
    cfg = EvaluateConfig(max_batches=1, batch_size=4, gen_tokens=6, num_samples=1, temperature=0.0, prompts=[prompt])
    report = evaluate(model, cfg, _data(files), variant="fp32", size_bytes=1)
    tokenizer = Tokenizer.from_file(str(files / "tokenizer.json"))
    text = TokenText(tokenizer, model.config.vocab_size)
    engine = ContinuousEngine(model, text, EOT_ID, slots=2)  # as a replica runs it, with another request beside
    served = {prompt: [], report.samples[0]["prompt"]: []}
    engine.step([Row(tokenizer.encode(p, add_special_tokens=False).ids, p, Sampling(max_tokens=6, temperature=0),
                     out.append) for p, out in served.items()])
    while engine.running():
        engine.step()
    assert report.generations[prompt] == "".join(d.text for d in served[prompt])
    assert report.samples[0]["generated"] == "".join(d.text for d in served[report.samples[0]["prompt"]])

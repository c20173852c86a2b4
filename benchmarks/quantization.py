"""What each quantization variant buys on trained weights: bytes, decode speed, perplexity, against a baseline.

Every variant is built from one model folder and measured in the same process,
round-robin (fp32, int8, ..., fp32, int8, ...), so machine noise hits them alike;
the tables report ratios to the baseline measured in this run. Decoding uses the
KV cache (`components.generation.generate(use_cache=True)`); a second table shows
what the cache changes as the context grows.

    # on trained weights: the fine-tuned model and validation split of a pipeline run
    .venv/bin/python benchmarks/quantization.py --run-dir .gptforge/runs/<run id>
    # random weights of a preset (speed and size only; perplexity means nothing)
    .venv/bin/python benchmarks/quantization.py --preset mini
    # GPU: bf16 vs fp32, int8/int4 weight-only vs bf16, GPT-2 124M shape
    python3 benchmarks/quantization.py --preset gpt2 --vocab 50257 --block 1024 --device cuda \\
        --variants fp32,bf16,int8_weight_only,int4_weight_only --baseline bf16
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere in the checkout

from components.evaluate import mean_loss  # noqa: E402
from components.generation import generate  # noqa: E402
from components.accounting import parameter_counts  # noqa: E402
from components.model import GPT, config_from_preset, load_model, save_model  # noqa: E402
from components.quantize import VARIANTS, load_variant, quantize_model, stored_bytes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="a pipeline run folder (workdir/runs/<id>): its fine-tuned model and val split")
    parser.add_argument("--model", help="a model folder written by save_model (instead of --run-dir)")
    parser.add_argument("--val", help="validation parquet (column `tokens`) for perplexity")
    parser.add_argument("--val-rows", type=int, default=64, help="validation rows for perplexity")
    parser.add_argument("--preset", default="mini", help="random weights of this preset when no model is given")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block", type=int, default=320)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per timed decode")
    parser.add_argument("--long", type=int, default=256, help="new tokens of the long decode (KV-cache table)")
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variants", default="fp32,bf16,fp16,int8_dynamic,int8_weight_only")
    parser.add_argument("--baseline", default="fp32", help="variant the ratios are taken against")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = args.variants.split(",")
    unknown = [v for v in variants + [args.baseline] if v not in VARIANTS]
    if unknown or args.baseline not in variants:
        parser.error(f"unknown variant(s) {unknown} or baseline not in --variants; known: {', '.join(VARIANTS)}")
    source, val_path = _inputs(args)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as root:
        if source is None:
            source = f"{root}/src"
            save_model(GPT(config_from_preset(args.preset, vocab_size=args.vocab, block_size=args.block)), source)
        params = parameter_counts(load_model(source))["total"]
        started = time.perf_counter()
        built = {v: quantize_model(source, v, f"{root}/{v}", device=args.device) for v in variants}
        disk = {v: stored_bytes(built[v].uri) for v in variants}
        models = {v: load_variant(built[v].uri, args.device) for v in variants}
        build_s = time.perf_counter() - started
    cfg = next(iter(models.values())).config
    rows = None
    if val_path:
        rows = {"tokens": np.array(pq.read_table(val_path, columns=["tokens"]).slice(0, args.val_rows)
                                   .column("tokens").to_pylist())}
    ppl = {v: math.exp(mean_loss(m, rows, 16)[0]) if rows is not None else float("nan") for v, m in models.items()}

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (8, args.prompt), generator=g).to(args.device)  # (8, P)
    if rows is not None:  # real text as prompts
        prompt = torch.tensor(rows["tokens"][:8, : args.prompt], dtype=torch.long, device=args.device)

    def ms_per_token(model, batch, n, use_cache=True):
        sync()
        start = time.perf_counter()
        generate(model, prompt[:batch], n, temperature=0.0, use_cache=use_cache)
        sync()
        return (time.perf_counter() - start) * 1000 / n

    for m in models.values():  # warm-up
        ms_per_token(m, 1, 4)
        ms_per_token(m, 8, 4)
    b1 = {v: [] for v in variants}
    b8 = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, m in models.items():
            b1[v].append(ms_per_token(m, 1, args.tokens))
            b8[v].append(ms_per_token(m, 8, args.tokens))

    print(f"model={'trained: ' + source if (args.run_dir or args.model) else 'random ' + args.preset} "
          f"params={params:,} n_layer={cfg.n_layer} n_embd={cfg.n_embd} vocab={cfg.vocab_size} block={cfg.block_size}")
    print(f"device={args.device} threads={args.threads} prompt={args.prompt} new_tokens={args.tokens} "
          f"repeats={args.repeats} val_rows={args.val_rows if rows is not None else 0} torch={torch.__version__} "
          f"machine={platform.machine()} cores={os.cpu_count()} build+load={build_s:.1f}s"
          + (f" gpu={torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""))
    base = args.baseline
    med = {v: statistics.median(b1[v]) for v in variants}
    med8 = {v: statistics.median(b8[v]) for v in variants}
    print(f"\n| variant | file MB | linear MB | linear vs {base} | val ppl | ppl vs {base} | "
          f"b1 ms/token | b1 speed vs {base} | b8 tokens/s | b8 speed vs {base} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        print(f"| {v} | {built[v].size_bytes / 1e6:.2f} | {disk[v][1] / 1e6:.2f} | {disk[base][1] / disk[v][1]:.2f}x smaller "
              f"| {ppl[v]:.3f} | {100 * (ppl[v] / ppl[base] - 1):+.2f}% | {med[v]:.2f} | {med[base] / med[v]:.2f}x "
              f"| {8000 / med8[v]:.0f} | {med8[base] / med8[v]:.2f}x |")

    if args.prompt + args.long > cfg.block_size:
        print(f"\n(KV-cache table skipped: prompt {args.prompt} + {args.long} tokens > block_size {cfg.block_size})")
        return
    print(f"\nKV cache, batch 1, ms per new token (median of {args.repeats}); cost ratio = "
          f"per-token cost of {args.long} tokens / of {args.tokens} tokens")
    print("| variant | cache | ms/token @%d | ms/token @%d | cost ratio |" % (args.tokens, args.long))
    print("|---|---|---:|---:|---:|")
    cases = [(base, True), (base, False)] + [(v, True) for v in variants if v.startswith("int8") and v != base][:1]
    for v, use_cache in cases:
        # without the cache a long decode is slow (each step reruns the whole context): time it once
        long_repeats = max(1, args.repeats // 2) if use_cache else 1
        short = statistics.median(ms_per_token(models[v], 1, args.tokens, use_cache) for _ in range(args.repeats))
        long = statistics.median(ms_per_token(models[v], 1, args.long, use_cache) for _ in range(long_repeats))
        print(f"| {v} | {'on' if use_cache else 'off'} | {short:.2f} | {long:.2f} | {long / short:.2f} |")


def _inputs(args) -> tuple[str | None, str | None]:
    """(model folder, val parquet) from --run-dir or --model/--val; (None, None) for random weights."""
    if args.run_dir:
        finetuned = sorted(glob.glob(os.path.join(args.run_dir, "candidates", "fp32")))
        vals = sorted(glob.glob(os.path.join(args.run_dir, "prepare_data", "val", "*.parquet")))
        if not finetuned or not vals:
            sys.exit(f"{args.run_dir}: expected candidates/fp32/ and prepare_data/val/part-*.parquet (a finished pipeline run)")
        return finetuned[0], vals[0]
    return args.model, args.val


if __name__ == "__main__":
    main()

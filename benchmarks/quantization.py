"""What each quantization variant buys: stored size, batch-1 decode speed, logit error, against fp32.

All variants are built from one model and timed in the same process, round-robin
(fp32, bf16, ..., fp32, bf16, ...), so machine noise hits them alike; the table
reports ratios to fp32 measured in this run. Weights are random: speed and size do
not depend on training, and the logit error is an upper bound of what a trained
model sees.

    .venv/bin/python benchmarks/quantization.py                    # preset mini, 1 thread
    .venv/bin/python benchmarks/quantization.py --preset tiny --threads 2
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch

from components.model import GPT, config_from_preset, save_model
from components.quantize import VARIANTS, load_variant, quantize_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per timed decode")
    parser.add_argument("--repeats", type=int, default=5, help="timed decodes per variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    variants = args.variants.split(",")

    with tempfile.TemporaryDirectory() as root:
        save_model(GPT(config_from_preset(args.preset, vocab_size=args.vocab, block_size=args.block)), f"{root}/src")
        built = {v: quantize_model(f"{root}/src", v, f"{root}/{v}") for v in variants}
        models = {v: load_variant(built[v].uri) for v in variants}

    prompt = torch.randint(0, args.vocab, (1, args.prompt))
    with torch.no_grad():
        reference = models["fp32"](prompt)[0].float() if "fp32" in models else None
        error = {v: float((m(prompt)[0].float() - reference).abs().max()) if reference is not None else float("nan")
                 for v, m in models.items()}
    for m in models.values():  # warm-up
        m.generate(prompt, 4, temperature=0.0)
    times = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, m in models.items():
            start = time.perf_counter()
            m.generate(prompt, args.tokens, temperature=0.0)
            times[v].append((time.perf_counter() - start) * 1000 / args.tokens)

    base_ms = statistics.median(times["fp32"]) if "fp32" in times else None
    base_size = built["fp32"].size_bytes if "fp32" in built else None
    print(f"preset={args.preset} vocab={args.vocab} prompt={args.prompt} new_tokens={args.tokens} "
          f"repeats={args.repeats} threads={args.threads} torch={torch.__version__} "
          f"machine={platform.machine()} cpus={torch.get_num_threads()}")
    print("| variant | size MB | size vs fp32 | ms/token (median) | speed vs fp32 | max abs logit diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for v in variants:
        ms = statistics.median(times[v])
        size = built[v].size_bytes
        print(f"| {v} | {size / 1e6:.2f} | {size / base_size if base_size else float('nan'):.2f}x | {ms:.2f} | "
              f"{base_ms / ms if base_ms else float('nan'):.2f}x | {error[v]:.4f} |")


if __name__ == "__main__":
    main()

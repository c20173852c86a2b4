"""Static against continuous batching, in-process: a mixed-length load and a uniform one.

    .venv/bin/python benchmarks/continuous_batching.py [--seconds 80] [--clients 32] [--rounds 4] [--alone 16]
                                                       [--loads mixed,uniform]

No Serve and no HTTP: the clients are threads that submit `Work`s straight to the engine's queue,
the endpoint's static `Batcher` (components/batching.py) or its `ContinuousBatcher`
(components/continuous.py), both with `serve.max_batch_size=32` on one torch thread, and wait for
their completion. What differs between the two is only the scheduling, which is what is measured
(HTTP and Serve add the same per request to both; benchmarks/serving.py measures them).

Model: the tiny preset (4 layers, 128 wide, vocabulary 4096) with random weights and a context of
320 tokens, so that a 256-token completion fits; greedy, and a random model practically never ends
early, so a request does the work its `max_tokens` asks.

Loads, `--seconds` each in all, split into `--rounds` rounds; in each round every load runs on both
engines, one after the other (which goes first alternates), so that a machine whose load from other
work drifts slows both alike and the ratios stay comparable. A round ends once the clients' last
requests have finished, and that drain counts in its time: keep rounds long against the longest
request (a 256-token request takes 1-2 s here), or the drain weighs on the result (on one machine,
3 s rounds gave continuous batching 1.52-1.55x static's mixed throughput, 20 s rounds 1.31x and 1.48x):
- mixed: each client sends back to back, each request's max_tokens drawn from {8, 64, 256} by its
  own random.Random(seed + client): requests/s, output tokens/s, p50/p99 latency of the 8-token requests;
- uniform: every request asks for 16 tokens: requests/s and output tokens/s;
- alone: `--alone` 8-token requests one at a time in each round (the latency the mixed load's 8-token
  requests are compared with; a median of many, as a single one moves with the machine's noise).

Besides the totals, each load's continuous / static ratio is printed per round (lowest, median,
highest): the two engines of one round ran seconds apart, so the spread of those ratios says how far
the total's ratio can be trusted. `--loads uniform --rounds 30` measures the uniform ratio alone, finely.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "def add(a, b):\n"
MIXED = (8, 64, 256)


def _setup():
    import sysconfig

    import torch

    from components.rows import TokenText
    from components.model import GPT, PRESETS, GPTConfig
    from components.tokenizer import train_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT(GPTConfig(block_size=320, vocab_size=4096, **PRESETS["tiny"])).eval()
    corpus = [p.read_text(errors="ignore") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]]
    tokenizer = train_tokenizer(corpus, vocab_size=4096)
    return model, tokenizer, TokenText(tokenizer, 4096)


def _batcher(kind: str, model, text):
    from components.batching import Batcher
    from components.config import ServeConfig
    from components.continuous import ContinuousBatcher, ContinuousEngine
    from components.generation import batch_fits, generate_batch
    from components.tokenizer import EOT_ID

    cfg = ServeConfig(batching=kind, max_batch_size=32, max_queued_rows=256, max_choices=1)
    if kind == "continuous":
        return ContinuousBatcher(lambda m: ContinuousEngine(m, text, EOT_ID, cfg.max_batch_size), cfg)
    return Batcher(lambda m, works: generate_batch(m, text, [r for w in works for r in w.rows], EOT_ID), cfg,
                   fits=lambda m, rows: batch_fits(rows, m.config.block_size))


def _request(batcher, model, ids, max_tokens: int) -> tuple[float, int]:
    """Submit one greedy completion and wait for it; (latency s, completion tokens)."""
    from components.batching import Work
    from components.rows import Row, Sampling

    done, tokens, failed = threading.Event(), [0], []

    def emit(delta):
        if delta.finish_reason is not None:
            tokens[0] = delta.completion_tokens
            done.set()

    def fail(error):
        failed.append(error)
        done.set()
    started = time.perf_counter()
    row = Row(ids, PROMPT, Sampling(max_tokens=max_tokens, temperature=0), emit, None, fail)
    batcher.submit(Work([row], model, fail))
    done.wait()
    if failed:
        raise failed[0]
    return time.perf_counter() - started, tokens[0]


def _load(batcher, model, ids, clients: int, seconds: float, pick) -> tuple[list[tuple[int, float, int]], float]:
    """Clients sending back to back for `seconds`: ([(max_tokens, latency s, tokens)], elapsed s)."""
    results: list[tuple[int, float, int]] = []
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        rng = random.Random(1000 + i)
        while time.monotonic() < stop_at:
            m = pick(rng)
            latency, tokens = _request(batcher, model, ids, m)
            results.append((m, latency, tokens))
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.monotonic() - started


def _summary(results: list[tuple[int, float, int]], elapsed: float) -> dict:
    short = sorted(lat for m, lat, _ in results if m == 8)
    return {"requests": len(results), "rps": len(results) / elapsed,
            "tokens_s": sum(tok for _, _, tok in results) / elapsed,
            "p50_8_ms": 1000 * statistics.median(short) if short else float("nan"),
            "p99_8_ms": 1000 * short[min(len(short) - 1, int(0.99 * len(short)))] if short else float("nan")}


def _spread(rounds: list[tuple[dict, dict]], key: str) -> str:
    """The per-round continuous / static ratios of `key`, e.g.
    '; per round 0.97-1.01-1.06x (lowest-median-highest), continuous ahead in 17 of 30'."""
    ratios = sorted(c[key] / st[key] for st, c in rounds)
    if len(ratios) < 2:
        return ""
    ahead = sum(r > 1 for r in ratios)
    return (f"; per round {ratios[0]:.2f}-{statistics.median(ratios):.2f}-{ratios[-1]:.2f}x (lowest-median-highest), "
            f"continuous ahead in {ahead} of {len(ratios)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=80.0, help="per load, all rounds together")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--alone", type=int, default=16, help="8-token requests alone per round and engine")
    parser.add_argument("--loads", default="mixed,uniform", help="which loads to run, comma-separated")
    args = parser.parse_args()
    every_load = {"mixed": lambda rng: rng.choice(MIXED), "uniform": lambda rng: 16}
    names = [name.strip() for name in args.loads.split(",") if name.strip()]
    unknown = [name for name in names if name not in every_load]
    if unknown or not names:
        parser.error(f"--loads {args.loads!r}: each must be one of {', '.join(every_load)}")
    loads = {name: every_load[name] for name in names}
    model, tokenizer, text = _setup()
    ids = tokenizer.encode(PROMPT).ids
    kinds = ("static", "continuous")
    batchers = {kind: _batcher(kind, model, text) for kind in kinds}
    runs = {kind: {"alone": [], **{load: ([], 0.0) for load in loads}} for kind in kinds}
    per_round = {load: [] for load in loads}  # (static, continuous) summary per round
    try:
        for kind in kinds:
            _request(batchers[kind], model, ids, 8)  # warm-up
        for r in range(args.rounds):
            order = kinds if r % 2 == 0 else kinds[::-1]
            if "mixed" in loads:  # its 8-token requests' latency is compared with theirs alone
                for kind in order:
                    runs[kind]["alone"] += [_request(batchers[kind], model, ids, 8)[0] for _ in range(args.alone)]
            for load, pick in loads.items():
                this_round = {}
                for kind in order:
                    results, elapsed = _load(batchers[kind], model, ids, args.clients, args.seconds / args.rounds, pick)
                    before, spent = runs[kind][load]
                    runs[kind][load] = (before + results, spent + elapsed)
                    this_round[kind] = _summary(results, elapsed)
                per_round[load].append((this_round["static"], this_round["continuous"]))
    finally:
        for batcher in batchers.values():
            batcher.stop()
    rows = {kind: {"alone_8_ms": 1000 * statistics.median(runs[kind]["alone"] or [float("nan")]),
                   **{load: _summary(*runs[kind][load]) for load in loads}} for kind in kinds}
    print(f"\n{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, torch threads 1; "
          f"{args.clients} clients, {args.seconds:.0f} s per load in {args.rounds} rounds; prompt {PROMPT!r}, greedy")
    print("| engine | load | requests/s | output tokens/s | 8-token p50 ms | 8-token p99 ms | requests |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kind, r in rows.items():
        for load in loads:
            m = r[load]
            p50, p99 = (f"{m['p50_8_ms']:.0f}", f"{m['p99_8_ms']:.0f}") if load == "mixed" else ("", "")
            print(f"| {kind} | {load} | {m['rps']:.1f} | {m['tokens_s']:.0f} | {p50} | {p99} | {m['requests']} |")
        if runs[kind]["alone"]:
            print(f"| {kind} | one 8-token request alone | | | {r['alone_8_ms']:.0f} | | {len(runs[kind]['alone'])} |")
    s, c = rows["static"], rows["continuous"]
    print()
    if "mixed" in loads:
        print(f"mixed load, continuous / static output tokens/s: "
              f"{c['mixed']['tokens_s'] / s['mixed']['tokens_s']:.2f}x (goal >= 2x){_spread(per_round['mixed'], 'tokens_s')}")
        print(f"mixed load, continuous 8-token p50 / alone: {c['mixed']['p50_8_ms'] / c['alone_8_ms']:.2f}x (goal <= 3x)")
    if "uniform" in loads:
        print(f"uniform 16-token load, continuous / static requests/s: "
              f"{c['uniform']['rps'] / s['uniform']['rps']:.2f}x (goal >= 1x){_spread(per_round['uniform'], 'rps')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

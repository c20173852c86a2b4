"""What tensor parallelism does to each worker: parameter bytes, peak memory and step time, ddp vs tp.

    python benchmarks/tensor_parallel.py                        # 2 CPU workers (gloo), a 63M-parameter GPT
    python benchmarks/tensor_parallel.py --device cuda --workers 8 --tp-degree 8 \
        --n-layer 24 --n-head 16 --n-embd 1024 --block-size 1024 --batch-size 8   # one 8-GPU node (nccl)

For each strategy the script starts `--workers` processes with torch.multiprocessing
(torch.distributed over gloo on a CPU, nccl on GPUs, one GPU per worker), builds the
same model in each (seed 0), splits it with `components.parallel.parallelize` and runs
the project's loop (`components.train.train`) on random tokens: `--warmup` steps,
then `--steps` timed ones. Per worker it reports:

- parameter count and bytes it holds (`components.accounting.held_parameters`);
- training-state bytes: parameters + gradients + AdamW moments it holds;
- peak memory during the timed steps: on a GPU `torch.cuda.max_memory_allocated`, on
  a CPU the process's peak resident set (VmHWM, reset before the timed steps through
  /proc/self/clear_refs), which includes PyTorch itself (the same for every strategy);
- step time (the slowest worker's) and tokens/s. Under tp a group of `--tp-degree`
  workers trains on one batch, so it trains fewer tokens per step than ddp does with
  the same per-worker batch: compare tokens/s, not only step time.

Each worker uses one CPU thread: two workers with two threads each on two cores ran
5-20x slower than with one.
Imports only torch and the project's components; no Ray, no MLflow.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components import accounting, devices, parallel  # noqa: E402
from components import model as gpt  # noqa: E402
from components.config import TrainingConfig  # noqa: E402
from components.train import Hooks, make_optimizer, train  # noqa: E402


def main() -> None:
    args = _args()
    cfg = gpt.GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer,
                        n_head=args.n_head, n_embd=args.n_embd)
    with torch.device("meta"):
        total = sum(p.numel() for p in gpt.GPT(cfg).parameters())
    print(f"model: {total:,} parameters ({total * 4 / 2**20:.0f} MiB fp32), batch {args.batch_size} x "
          f"{args.block_size} per worker, {args.workers} workers on {args.device}, tp_degree {args.tp_degree}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, torch {torch.__version__}", flush=True)
    results = {}
    for strategy in args.strategies.split(","):
        tp = args.tp_degree if strategy in parallel.TENSOR_PARALLEL else 1
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            mp.spawn(_worker, args=(args, cfg, strategy, tp, os.path.join(tmp, "store"), out),
                     nprocs=args.workers, join=True)
            results[strategy] = json.loads(Path(out).read_text())
        _print(strategy, results[strategy])
    if "ddp" in results:
        base = results["ddp"]
        for strategy, r in results.items():
            if strategy == "ddp":
                continue
            print(f"{strategy} / ddp per worker (worker 0): parameter bytes "
                  f"{r['workers'][0]['param_bytes'] / base['workers'][0]['param_bytes']:.2f}x, training state "
                  f"{r['workers'][0]['state_bytes'] / base['workers'][0]['state_bytes']:.2f}x, peak memory "
                  f"{r['workers'][0]['peak_bytes'] / base['workers'][0]['peak_bytes']:.2f}x; step time "
                  f"{r['step_s'] / base['step_s']:.2f}x, tokens/s {r['tokens_per_s'] / base['tokens_per_s']:.2f}x")


def _worker(rank: int, args, cfg: gpt.GPTConfig, strategy: str, tp: int, store: str, out: str) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(1)
    devices.configure_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank,
                            world_size=args.workers)
    torch.manual_seed(0)
    model = parallel.parallelize(gpt.GPT(cfg), strategy, device, devices.FP32, tp_degree=tp)
    replicas = parallel.data_parallel_size(model)
    loop = TrainingConfig(max_steps=args.warmup + args.steps, lr=1e-4, min_lr=1e-4, warmup_steps=0,
                          weight_decay=0.1, grad_clip=1.0, log_every=10**9, eval_every=0, checkpoint_every=0)
    optimizer = make_optimizer(model, loop, device)
    layout = parallel.tensor_parallel_layout(model)
    replica = layout.mesh["dp"].get_local_rank() if layout is not None else rank
    g = torch.Generator().manual_seed(1 + replica)  # a tp group draws the same rows
    batches = iter(lambda: {"tokens": torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.block_size + 1),
                                                    generator=g)}, None)
    warm = dataclasses.replace(loop, max_steps=args.warmup)
    train(model, batches, warm, Hooks(), device, optimizer=optimizer)
    gc.collect()
    _reset_peak(device)
    dist.barrier()
    start = time.perf_counter()
    train(model, batches, loop, Hooks(), device, optimizer=optimizer, start_step=args.warmup)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    pieces = accounting.held_parameters(model)
    param_bytes = sum(p[4] for p in pieces)
    mine = {
        "param_count": sum(p[3] for p in pieces),
        "param_bytes": param_bytes,
        "state_bytes": _state_bytes(param_bytes, optimizer),
        "peak_bytes": _peak(device),
        "elapsed_s": elapsed,
    }
    every = [None] * args.workers
    dist.all_gather_object(every, mine)
    if rank == 0:
        step_s = max(w["elapsed_s"] for w in every) / args.steps
        Path(out).write_text(json.dumps({
            "workers": every, "step_s": step_s,
            "tokens_per_s": replicas * args.batch_size * cfg.block_size / step_s,
        }))
    dist.destroy_process_group()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes(param_bytes: int, optimizer) -> int:
    """Bytes of what training keeps between steps on this worker: parameters, gradients, AdamW moments.

    Gradients are freed by the loop after each step (set_to_none), so they count as the
    parameters' size (`param_bytes`, this worker's pieces): what the backward pass allocates again.
    """
    moments = sum(_local(t).numel() * t.element_size() for state in optimizer.state.values()
                  for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    return 2 * param_bytes + moments


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _print(strategy: str, r: dict) -> None:
    print(f"{strategy}: step {r['step_s']:.2f} s, {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    for rank, w in enumerate(r["workers"]):
        print(f"  worker {rank}: {w['param_count']:,} params, {w['param_bytes'] / 2**20:.1f} MiB; "
              f"training state {w['state_bytes'] / 2**20:.1f} MiB; peak memory {w['peak_bytes'] / 2**20:.1f} MiB",
              flush=True)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="ddp,tp", help="comma-separated, ddp first for the ratios")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tp-degree", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--n-layer", type=int, default=8)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    return p.parse_args()


if __name__ == "__main__":
    main()

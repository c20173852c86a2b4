"""Pretraining throughput: the project's training step against a minimal reference loop, same run.

    python benchmarks/pretrain.py --no-ray                         # the project's step vs the reference, no Ray
    python benchmarks/pretrain.py                                  # also through Ray Train + Ray Data, and the feed alone
    python benchmarks/pretrain.py --no-ray --preset gpt2 --block-size 1024 --vocab-size 50304 \
        --batch-size 12 --compile --no-bias                        # the GPT-2 124M shape on a GPU

Every path trains the same model shape on the same random tokens and measures
tokens/s over the steps after a warm-up (compilation happens in the warm-up).

- project: `components.train.train` on the model `components.parallel.parallelize`
  returns, fed through the loop's own batch path (pinned memory, non_blocking).
- reference: a loop written here in ten lines, nanoGPT's recipe: bf16 autocast on a
  GPU, fused AdamW, optional torch.compile, no logging, no accumulation.
- ray (without --no-ray): the project's step inside a Ray Train worker fed by Ray
  Data from parquet shards and logging to MLflow, as `gptforge run` trains; the
  ratio ray / project is what Ray costs. It runs once per round, after that
  round's no-Ray windows (`--rounds`); the reported ratio is the median of the
  rounds'. And Ray Data's feed alone, in tokens/s.

`--no-ray` imports only torch, numpy and the project's components, so it runs on a GPU
machine that has PyTorch and nothing else. MFU is against the device's dense bf16
peak (`components.devices.PEAK_TFLOPS`); a CPU has none.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components import model as gpt  # noqa: E402
from components import devices, parallel  # noqa: E402
from components.config import TrainingConfig  # noqa: E402
from components.recipe import TrainPlan  # noqa: E402
from components.tokenizer import TOKENIZER_FILE  # noqa: E402
from components.train import Batches, Hooks, make_optimizer, train  # noqa: E402


def main() -> None:
    args = _args()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    devices.configure_device(device)
    precision = devices.resolve_precision(args.precision, device)
    cfg = gpt.config_from_preset(args.preset, vocab_size=args.vocab_size, block_size=args.block_size, bias=args.bias)
    flops = gpt.flops_per_token(cfg)
    peak = devices.peak_flops(device)
    rows = np.random.default_rng(0).integers(0, args.vocab_size, size=(args.batch_size * 16, args.block_size + 1))
    total_steps = (args.warmup_windows + args.windows) * args.window  # for the Ray path
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} threads'}), "
          f"torch {torch.__version__}, preset {args.preset}: {sum(p.numel() for p in gpt.GPT(cfg).parameters()):,} "
          f"params, batch {args.batch_size} x {args.block_size}, vocab {args.vocab_size}, bias {args.bias}, "
          f"precision {precision.name}, compile {args.compile}; {args.windows} windows of {args.window} steps "
          f"after {args.warmup_windows} warm-up", flush=True)

    # Windows of the two paths alternate, so a machine that slows down part-way (shared CPUs)
    # slows both alike and the ratio holds. The Ray path cannot alternate window by window (a
    # Ray Train run is one job), so it alternates by round: each round measures the project's
    # windows with no Ray running, then one Ray Train run; the ratio is taken within a round.
    reference = _reference_windows(cfg, rows, args, device)
    project = _project_windows(cfg, rows, args, device, precision)
    times = {"reference": [], "project": []}
    rounds, feed = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for window in range(args.warmup_windows + args.windows if round_ == 0 else args.windows):
                for name, path in (("reference", reference), ("project", project)):
                    tokens_per_s = next(path)
                    if round_ > 0 or window >= args.warmup_windows:
                        times[name].append(tokens_per_s)
            if not args.no_ray:
                ray_tps, waiting, round_feed = _ray(cfg, rows, args, device, total_steps, tmp, measure_feed=feed is None)
                feed = feed or round_feed
                this_round = times["project"][-args.windows:]  # the project's windows measured just before
                rounds.append((statistics.median(this_round), ray_tps, waiting))
                print(f"  round {round_ + 1}: project {rounds[-1][0]:,.0f} tok/s, ray {ray_tps:,.0f} tok/s "
                      f"({ray_tps / rounds[-1][0]:.2f}x; {waiting:.1%} of the Ray path's time waiting for data)",
                      flush=True)
    results = {name: statistics.median(values) for name, values in times.items()}
    for name, tps in results.items():
        print(f"  {name:<10} {tps:>12,.0f} tok/s (median of {len(times[name])} windows)", flush=True)
    if rounds:
        results["ray"] = statistics.median(r[1] for r in rounds)
        ratio = statistics.median(r[1] / r[0] for r in rounds)
        print(f"  ray        {results['ray']:>12,.0f} tok/s (median of {len(rounds)} runs)")
        print(f"  Ray path / project, median of the rounds' ratios: {ratio:.2f}x (goal >= 0.95x on this machine)")
        print(f"  Ray Data feed alone: {feed:,.0f} tok/s (one consumer, the workers' iterator settings)")

    print()
    print(f"| path | tokens/s | MFU | vs reference |{' vs project |' if 'ray' in results else ''}")
    print(f"|---|---:|---:|---:|{'---:|' if 'ray' in results else ''}")
    for name, tps in results.items():
        mfu = f"{tps * flops / peak:.1%}" if peak else "n/a"
        extra = f" {tps / results['project']:.2f}x |" if "ray" in results else ""
        print(f"| {name} | {tps:,.0f} | {mfu} | {tps / results['reference']:.2f}x |{extra}")


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(gpt.PRESETS))
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step (per worker)")
    p.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (a Ray worker uses 1)")
    p.add_argument("--window", type=int, default=10, help="steps per measured window")
    p.add_argument("--windows", type=int, default=3, help="measured windows")
    p.add_argument("--warmup-windows", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of (project windows, one Ray Train run); the Ray ratio is their median")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray Train path (needs only PyTorch)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers for the ray path")
    return p.parse_args()


def _reference_windows(cfg, rows, args, device):
    """nanoGPT's training step, written out: the baseline. Yields tokens/s of each window of steps."""
    torch.manual_seed(0)
    model = gpt.GPT(cfg).to(device)
    if args.compile:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    amp = devices.resolve_precision(args.precision, device).autocast_dtype
    batches = torch.from_numpy(rows).view(-1, args.batch_size, args.block_size + 1)  # (N, B, T+1)
    step = 0
    while True:
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.window):
            batch = batches[step % len(batches)]
            step += 1
            x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()  # (B, T) each
            if device.type == "cuda":
                x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        _sync(device)
        yield args.window * args.batch_size * args.block_size / (time.perf_counter() - start)


def _project_windows(cfg, rows, args, device, precision):
    """The project's step: parallelize + components.train.train, one window per call, timed by the loop."""
    torch.manual_seed(0)
    model = parallel.parallelize(gpt.GPT(cfg), "ddp", device, precision, args.compile)
    epoch = lambda e: ({"tokens": rows[i:i + args.batch_size]} for i in range(0, len(rows), args.batch_size))
    batches = Batches(epoch)
    total = (args.warmup_windows + args.windows * args.rounds) * args.window
    loop = TrainingConfig(max_steps=total, lr=1e-4, min_lr=1e-5, warmup_steps=0, weight_decay=0.1, grad_clip=1.0,
                          log_every=args.window, eval_every=0, checkpoint_every=0)
    optimizer = make_optimizer(model, loop, device)
    for start in range(0, total, args.window):
        logs = []
        window = dataclasses.replace(loop, max_steps=start + args.window)
        train(model, batches, window, Hooks(log=lambda m, s: logs.append(m)), device, precision,
              optimizer=optimizer, start_step=start)
        yield logs[-1]["train/tokens_per_s"]


def _ray(cfg, rows, args, device, total_steps, tmp, measure_feed) -> tuple[float, float, float | None]:
    """One Ray Train run of the project's step, fed by Ray Data from parquet and logging to MLflow as
    `gptforge run` trains; Ray is started for the run and shut down after it.

    Returns the median tokens/s per worker over the windows after the warm-up, the median share of
    those windows spent waiting for data, and (with `measure_feed`) Ray Data's feed alone in tokens/s.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.train import rows_from_arrow, to_inputs_and_targets
    from pipelines import ray_runtime
    from pipelines.tracking import Tracker

    data = os.path.join(tmp, "train.parquet")
    if not os.path.exists(data):
        feed_rows = np.tile(rows, (max(1, 20000 // len(rows)), 1)).astype(np.int32)  # enough rows to time the feed
        pq.write_table(pa.table({"tokens": pa.array(list(feed_rows), pa.list_(pa.int32()))}), data)
    tokenizer = os.path.join(tmp, TOKENIZER_FILE)
    Path(tokenizer).write_text("{}")
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "benchmark", artifact_location=os.path.join(tmp, "artifacts"))
    ray_runtime.init_ray(num_cpus=max(4, args.workers + 2))
    try:
        import ray.data

        feed = None
        if measure_feed:  # the iterator settings the workers use (pipelines/ray_runtime.py)
            dataset = ray.data.read_parquet(data).materialize()
            start, tokens = time.perf_counter(), 0
            for table in dataset.iter_batches(batch_size=args.batch_size, batch_format="pyarrow", drop_last=True,
                                              prefetch_batches=4, local_shuffle_buffer_size=args.batch_size * 8,
                                              local_shuffle_seed=0):
                x, _ = to_inputs_and_targets(rows_from_arrow(table))
                tokens += x.numel()
            feed = tokens / (time.perf_counter() - start)

        training = TrainingConfig(
            num_workers=args.workers, use_gpu=device.type == "cuda", max_steps=total_steps, batch_size=args.batch_size,
            lr=1e-4, min_lr=1e-5, warmup_steps=0, weight_decay=0.1, grad_clip=1.0, log_every=args.window, seed=0,
            strategy="ddp", precision=args.precision, compile=args.compile, eval_every=0,
            checkpoint_every=total_steps, max_failures=0)
        with tracker.run("ray-path") as logger:
            plan = TrainPlan(training, cfg, extra_files=(tokenizer,))
            ray_runtime.fit(plan, f"bench-{logger.run_id}", data, None, os.path.join(tmp, "ray"), logger)
            after_warmup = args.warmup_windows * args.window
            speed = [v for step, v in logger.metric_history("train/tokens_per_s") if step > after_warmup]
            waiting = [v for step, v in logger.metric_history("train/data_wait_frac") if step > after_warmup]
        return statistics.median(speed) / args.workers, statistics.median(waiting), feed
    finally:
        ray_runtime.shutdown_ray()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()

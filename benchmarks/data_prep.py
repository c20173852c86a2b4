"""Data preparation throughput: the Ray Data path against one plain process, same corpus, same run.

    python benchmarks/data_prep.py                      # the stdlib sources, at 1 and 2 CPUs
    python benchmarks/data_prep.py --source DIR --cpus 1 2 4 --repeats 3

Method: a tokenizer is trained once on the corpus and handed to both paths (`tokenizer.file`),
so both do the same work: read every file, tokenize (`encode_batch_fast`), pack rows of
block_size + 1 and write parquet.
- baseline: one process, no Ray: list, read, one batched `tokenizers` call, `pack_rows`, one
  parquet file. Its `tokenizers` thread pool gets as many threads as the run has CPUs; the Ray
  Data tasks keep the pipeline's one thread each.
- Ray Data path: `pipelines.data_prep.prepare_data` end to end (scan pass with hashing and
  deduplication, packing pass writing shards, manifest), on a local Ray of N CPUs; the SFT
  source is one small file so that the pairs cost nothing.
Each CPU count runs in its own process pinned with `taskset` to N cores (Ray's workers inherit
it), and the two paths alternate `--repeats` times; the best run of each counts (the ratio of
the medians is printed beside it, a check on a noisy machine). MB/s is
UTF-8 text per second of wall time, tokens/s the document tokens (with one EOT each).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

_SFT_FILE = "".join(f'def f{k}(x):\n    """Return x plus {k}."""\n    y = x + {k}\n    return y\n\n' for k in range(16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="stdlib", help="data.source: stdlib, a folder or a file")
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    from components.sources import iter_documents
    from components.tokenizer import train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / "tokenizer.json"
        train_tokenizer((d.text for d in iter_documents(args.source)), args.vocab_size).save(str(tokenizer))
        print(f"source {args.source}, block_size {args.block_size}, vocab {args.vocab_size}, "
              f"best of {args.repeats}; {os.cpu_count()} cores here")
        print(f"{'CPUs':>4}  {'baseline MB/s':>13}  {'tok/s':>10}  {'Ray Data MB/s':>13}  {'tok/s':>10}  {'ratio':>6}"
              f"  {'median ratio':>12}")
        for n in args.cpus:
            cores = ",".join(str(c) for c in range(n))
            env = {k: v for k, v in os.environ.items() if k != "RAYON_NUM_THREADS"}
            out = subprocess.run(["taskset", "-c", cores, sys.executable, __file__, "--child", str(n),
                                  "--tokenizer", str(tokenizer), "--source", args.source, "--repeats",
                                  str(args.repeats), "--block-size", str(args.block_size)],
                                 env=env, check=True, capture_output=True, text=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base, ray_ = r["baseline"], r["ray"]
            print(f"{n:>4}  {base['mb_s']:>13.2f}  {base['tok_s']:>10,.0f}  {ray_['mb_s']:>13.2f}  "
                  f"{ray_['tok_s']:>10,.0f}  {ray_['mb_s'] / base['mb_s']:>5.2f}x"
                  f"  {ray_['median_mb_s'] / base['median_mb_s']:>11.2f}x")


def _child(args) -> dict:
    from pipelines import ray_runtime

    ray_runtime.init_ray(num_cpus=args.child)
    # The baseline's `tokenizers` pool gets a thread per CPU. Set after Ray has started, so that its
    # workers keep the pipeline's own setting (one thread per task, pipelines/data_prep.py).
    os.environ["RAYON_NUM_THREADS"] = str(args.child)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {"baseline": [], "ray": []}
            for i in range(args.repeats):
                runs["baseline"].append(_baseline(args, Path(tmp) / f"base{i}"))
                runs["ray"].append(_ray_path(args, Path(tmp), i))
            return {name: max(results, key=lambda r: r["mb_s"]) | {"all_mb_s": [r["mb_s"] for r in results],
                                                                    "median_mb_s": statistics.median(
                                                                        r["mb_s"] for r in results)}
                    for name, results in runs.items()}
    finally:
        ray_runtime.shutdown_ray()


def _baseline(args, out: Path) -> dict:
    """One process: read, one batched encode, pack, write one parquet file."""
    from tokenizers import Tokenizer

    from components.packing import pack_rows, row_dtype, write_rows
    from components.sources import iter_documents

    start = time.perf_counter()
    tokenizer = Tokenizer.from_file(args.tokenizer)
    texts = [d.text for d in iter_documents(args.source)]
    ids = [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    rows = pack_rows(ids, args.block_size, row_dtype(tokenizer.get_vocab_size()))
    write_rows(out / "train.parquet", rows)
    seconds = time.perf_counter() - start
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return _rates(n_bytes, sum(len(x) + 1 for x in ids), seconds)


def _ray_path(args, tmp: Path, i: int) -> dict:
    from components.config import DataConfig, FinetuneConfig, TokenizerConfig
    from pipelines.data_prep import prepare_data

    sft = tmp / "sft"
    sft.mkdir(exist_ok=True)
    (sft / "m.py").write_text(_SFT_FILE)
    start = time.perf_counter()
    # val_fraction as small as allowed: both paths then pack one stream of about the same size.
    data = prepare_data(str(tmp / f"ray{i}"), DataConfig(source=args.source, block_size=args.block_size,
                                                         val_fraction=0.01),
                        TokenizerConfig(file=args.tokenizer), FinetuneConfig(source=str(sft), heldout_fraction=0.5))
    seconds = time.perf_counter() - start
    s = data.stats
    return _rates(s["train_bytes"] + s["val_bytes"],
                  s["train_tokens"] + s["val_tokens"] + s["train_tail_tokens_dropped"] + s["val_tail_tokens_dropped"],
                  seconds)


def _rates(n_bytes: int, n_tokens: int, seconds: float) -> dict:
    return {"mb_s": n_bytes / 1e6 / seconds, "tok_s": n_tokens / seconds, "seconds": seconds, "bytes": n_bytes,
            "tokens": n_tokens}


if __name__ == "__main__":
    main()

"""What S3 storage adds to the tiny pipeline, against local storage, in the same run.

Starts an S3 server (moto, on 127.0.0.1) with a bucket, then runs `gptforge run` on the
tiny experiment in turns with `storage` local and `storage=s3://...`, each in a fresh
workdir with the stage cache off, and reports each run's wall time and the ratio.
Embedded local Ray, as a laptop runs it; the S3 server is in-process memory on the same
machine, so this measures the storage code path (uploads, listings, node-local copies),
not a network.

    .venv/bin/python benchmarks/storage.py --repeats 2
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.cluster_processes import S3Server  # noqa: E402 - the project root is on the path from here on
from tests.helpers import JOB_OVERRIDES, TINY_EXPERIMENT, cli_command, cli_env  # noqa: E402


def timed_run(storage: str, workdir: Path, env: dict) -> float:
    started = time.monotonic()
    result = subprocess.run(cli_command("run", str(TINY_EXPERIMENT), *JOB_OVERRIDES, "--no-cache",
                                        f"workdir={workdir}", *([f"storage={storage}"] if storage else [])),
                            cwd=workdir.parent, env=cli_env(env), capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"run with storage={storage or 'workdir'} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternating")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-storage-") as tmp:
        tmp = Path(tmp)
        s3 = S3Server(tmp)
        try:
            env = {**s3.env, "GPTFORGE_CACHE": str(tmp / "cache")}
            times: dict[str, list[float]] = {"local": [], "s3": []}
            for i in range(args.repeats):
                for kind, storage in (("local", ""), ("s3", f"s3://{s3.bucket}/bench-{i}")):
                    workdir = tmp / f"{kind}-{i}"
                    workdir.mkdir()
                    times[kind].append(timed_run(storage, workdir, env))
                    print(f"{kind:5s} run {i + 1}: {times[kind][-1]:.1f}s", flush=True)
        finally:
            s3.stop()
    local, remote = statistics.median(times["local"]), statistics.median(times["s3"])
    print(f"\nmachine: {platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}")
    print(f"tiny pipeline, median of {args.repeats}: local storage {local:.1f}s, S3 storage {remote:.1f}s, "
          f"S3 adds {remote - local:+.1f}s ({remote / local:.2f}x)")


if __name__ == "__main__":
    main()

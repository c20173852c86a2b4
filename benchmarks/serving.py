"""Throughput and latency of the Serve endpoint at 1, 8 and 32 concurrent clients, batching on and off.

    .venv/bin/python benchmarks/serving.py                          # a tiny-preset model (random weights)
    .venv/bin/python benchmarks/serving.py --folder .gptforge/serving/tiny-v1   # the champion's checked copy
    .venv/bin/python benchmarks/serving.py --batching static        # the other scheduler (default: continuous)

It starts a local Ray and deploys the endpoint twice from the same model folder:
batching on (serve.max_batch_size=32) and off (max_batch_size=1). For each it runs
1, 8 and 32 client threads, each sending completions back to back over its own
keep-alive connection for `--seconds`, and reports requests/s, p50 and p99 latency.
The baseline for the overhead: the replica's own work for one request (tokenize +
generate with the same engine as `--batching` picks, one torch thread) called directly in this
process, alternating call by call with one HTTP request to the endpoint (batching
on), so both see the same load; the median of the paired differences is what
Serve + HTTP add. The replica's `Server-Timing` header splits that further: the
client's time minus the replica's is the transport (HAProxy or Serve's proxy, and
HTTP); the replica's admit time (body, validation, tokenizing, queueing) is the rest.

Serve's ingress is whatever the environment selects when Ray starts: gptforge's
default is HAProxy (pipelines/ray_runtime.py); `RAY_SERVE_ENABLE_HA_PROXY=0
RAY_SERVE_THROUGHPUT_OPTIMIZED=0` measures Serve's default Python proxy instead.

Random weights cost the same per token as trained ones; the requests ask for a fixed
`max_tokens` and the random model practically never ends early, so every request
does the same work. The clients share the machine with the replica: on 2 cores
they take CPU from it, which is part of what is measured.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "def add(a, b):\n"


def _make_folder(root: Path) -> str:
    """A candidate folder of the tiny preset's shape (what `gptforge run` trains by default)."""
    import torch

    from components.files import write_checksums
    from components.model import GPTConfig, GPT, PRESETS, save_model
    from components.quantize import quantize_model
    from components.tokenizer import TOKENIZER_FILE, train_tokenizer

    torch.manual_seed(0)
    src, folder = root / "src", root / "candidate"
    save_model(GPT(GPTConfig(block_size=128, vocab_size=4096, **PRESETS["tiny"])), str(src))
    import sysconfig

    corpus = [p.read_text(errors="ignore") for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]]
    train_tokenizer(corpus, vocab_size=4096).save(str(src / TOKENIZER_FILE))
    quantize_model(str(src), "fp32", str(folder))
    write_checksums(folder)
    return str(folder)


def _client_loop(host: str, port: int, body: bytes, stop_at: float, latencies: list, errors: list) -> None:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    while time.monotonic() < stop_at:
        started = time.perf_counter()
        try:
            conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                errors.append(f"{response.status} {payload[:200]!r}")
                continue
        except OSError as error:
            errors.append(repr(error))
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=120)
            continue
        latencies.append(time.perf_counter() - started)
    conn.close()


def _load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    _client_loop(host, int(port), body, time.monotonic() + 1.0, [], [])  # warm-up
    latencies: list[float] = []
    errors: list[str] = []
    started = time.monotonic()
    stop_at = started + seconds
    threads = [threading.Thread(target=_client_loop, args=(host, int(port), body, stop_at, latencies, errors))
               for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    ordered = sorted(latencies)
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "rps": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(ordered) if ordered else float("nan"),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan"),
            "first_error": errors[0] if errors else ""}


def _generator_alone(loaded, batching: str):
    """A function that generates one request's row in this process, with the engine the endpoint runs
    (for continuous batching one engine, kept from call to call as the replica keeps its own)."""
    from components.continuous import ContinuousEngine
    from components.generation import generate_batch
    from components.tokenizer import EOT_ID

    if batching == "static":
        return lambda row: generate_batch(loaded.model, loaded.text, [row], EOT_ID)
    engine = ContinuousEngine(loaded.model, loaded.text, EOT_ID, slots=1)

    def generate(row) -> None:
        engine.step([row])
        while engine.running():
            engine.step()
    return generate


def _overhead(url: str, folder: str, batching: str, max_tokens: int, pairs: int) -> dict:
    """Median in-process call, median HTTP call, and the median of their paired differences, interleaved."""
    import torch

    from components.rows import Row, Sampling
    from pipelines.model_loading import FolderLoader

    torch.set_num_threads(1)
    loaded = FolderLoader(folder)()
    generate_alone = _generator_alone(loaded, batching)
    sampling = Sampling(max_tokens=max_tokens, temperature=0)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    local, remote, replica, admit = [], [], [], []
    for i in range(pairs + 5):
        started = time.perf_counter()
        ids = loaded.tokenizer.encode(PROMPT).ids
        generate_alone(Row(ids, PROMPT, sampling, lambda delta: None))
        middle = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
        if i >= 5:  # warm-up
            local.append(middle - started)
            remote.append(time.perf_counter() - middle)
            timing = dict(part.split(";dur=") for part in response.getheader("Server-Timing").split(", "))
            replica.append(float(timing["replica"]) / 1000)
            admit.append(float(timing["admit"]) / 1000)
    conn.close()
    ms = lambda values: 1000 * statistics.median(values)  # noqa: E731
    return {"in_process_ms": ms(local), "http_ms": ms(remote),
            "overhead_ms": ms([r - l for r, l in zip(remote, local)]),
            "transport_ms": ms([r - s for r, s in zip(remote, replica)]), "admit_ms": ms(admit)}


def _serve_and_measure(folder: str, batching: str, batch_size: int, clients: list[int], seconds: float,
                       max_tokens: int, port: int, overhead: dict | None = None) -> list[dict]:
    from components.config import ServeConfig
    from pipelines import serving
    from pipelines.model_loading import FolderLoader

    cfg = ServeConfig(port=port, batching=batching, max_batch_size=batch_size, max_choices=1, max_queued_rows=256,
                      max_ongoing_requests=256, num_cpus=1, poll_interval_s=0)
    url = serving.deploy(FolderLoader(folder, "bench:v0"), cfg, timeout_s=300)
    try:
        if overhead is not None:
            overhead.update(_overhead(url, folder, batching, max_tokens, pairs=60))
        return [{"batch": batch_size, **_load(url, c, seconds, max_tokens)} for c in clients]
    finally:
        serving.shutdown()


def _ingress() -> str:
    return "HAProxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Serve's Python proxy"


def main() -> int:
    from components.config import ServeConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", help="a candidate folder (default: a tiny-preset model made here)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=15.0, help="measuring time per client count")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="serve.max_batch_size with batching on")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--batching", choices=("continuous", "static"), default=ServeConfig().batching,
                        help="serve.batching of both deployments (default: the endpoint's default)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT", "1")
    clients = [int(c) for c in args.clients.split(",")]

    from pipelines import ray_runtime

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or _make_folder(Path(tmp))
        ray_runtime.init_ray(2)
        overhead: dict = {}
        try:
            rows = []
            for batch_size in (args.batch_size, 1):  # on, then off
                rows += _serve_and_measure(folder, args.batching, batch_size, clients, args.seconds, args.max_tokens,
                                           args.port, overhead if batch_size > 1 else None)
        finally:
            ray_runtime.shutdown_ray()

    print(f"\nmodel folder: {args.folder or 'tiny preset, random weights'}; prompt {PROMPT!r}, "
          f"max_tokens {args.max_tokens}, greedy; {args.batching} batching; {args.seconds:.0f} s per point; "
          f"{os.cpu_count()} CPUs")
    print("| batching | clients | requests/s | p50 ms | p99 ms | requests | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        mode = f"on ({r['batch']})" if r["batch"] > 1 else "off"
        print(f"| {mode} | {r['clients']} | {r['rps']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['requests']} | {r['errors']} |")
    on = {r["clients"]: r for r in rows if r["batch"] > 1}
    off = {r["clients"]: r for r in rows if r["batch"] == 1}
    top, low = max(clients), min(clients)
    print(f"\nbatching on / off at {top} clients: {on[top]['rps'] / off[top]['rps']:.2f}x (goal >= 2x)")
    print(f"batching on, {top} clients / {low} client: {on[top]['rps'] / on[low]['rps']:.2f}x (goal >= 1x)")
    print(f"1 client, interleaved: in-process call p50 {overhead['in_process_ms']:.1f} ms, HTTP p50 "
          f"{overhead['http_ms']:.1f} ms; Serve + HTTP overhead (median of paired differences): "
          f"{overhead['overhead_ms']:.1f} ms (goal <= 5 ms)")
    print(f"  of which outside the replica (ingress + HTTP, client time - Server-Timing replica): "
          f"{overhead['transport_ms']:.1f} ms; the replica's admit (body, checks, tokenize, queue): "
          f"{overhead['admit_ms']:.1f} ms; ingress: {_ingress()}")
    for r in rows:
        if r["first_error"]:
            print(f"first error (batch {r['batch']}, {r['clients']} clients): {r['first_error']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

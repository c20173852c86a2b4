"""The `gptforge` command line.

User errors (a bad experiment file, an empty corpus, nothing promoted yet)
print one message and exit 2 without a traceback; bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from components.config import ConfigError, ExperimentConfig, load_config
from components.data import DataError
from pipelines.serving import ServeError

DEFAULT_EXPERIMENT = "experiments/tiny.yaml"
USER_ERRORS = (ConfigError, DataError, LookupError, ServeError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # `kill` and job schedulers send SIGTERM: end MLflow runs and Ray/Serve as on Ctrl-C.
    # SIGINT is set explicitly because a shell starting us in the background ignores it.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs below
        cause = getattr(error, "cause", None) or error  # a Ray task re-raises the task's exception as .cause
        if isinstance(cause, USER_ERRORS):
            print(f"gptforge: error: {cause}", file=sys.stderr)
            return 2
        raise


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptforge",
        description="Train, fine-tune, quantize, evaluate, promote and serve GPT-style models "
                    "from one YAML experiment, on Ray, tracked in MLflow.",
        epilog="MLFLOW_TRACKING_URI selects the tracking server (default: a SQLite file in the experiment's "
               "workdir); RAY_ADDRESS selects a Ray cluster (default: an embedded local Ray).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the whole pipeline: data, pretrain, finetune, quantize, evaluate, promote",
        description="Run every stage of an experiment under one MLflow parent run, print the candidates "
                    "and the new champion, and with --serve keep the champion answering HTTP.",
    )
    _experiment_args(run)
    run.add_argument("--serve", action="store_true",
                     help="after the run, serve the champion on Ray Serve until Ctrl-C")
    run.set_defaults(handler=_run)

    serve = sub.add_parser(
        "serve", help="serve the experiment's current champion on Ray Serve (POST /v1/completions)",
        description="Load the registered model's `champion` version from MLflow and answer "
                    "POST /v1/completions, GET /v1/models and GET /healthz until Ctrl-C.",
    )
    _experiment_args(serve)
    serve.add_argument("--alias", default="champion", help="registry alias to serve (default: champion)")
    serve.set_defaults(handler=_serve)

    runs = sub.add_parser("runs", help="list recent pipeline runs of an experiment from MLflow",
                          description="List recent pipeline runs (newest first) with their status and champion.")
    _experiment_args(runs)
    runs.set_defaults(handler=_runs)
    return parser


def _experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default=None, metavar="EXPERIMENT",
                        help=f"experiment YAML (default: {DEFAULT_EXPERIMENT} if present, else built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. pretrain.max_steps=50 quantize.variants=[fp32,bf16]")


def _load(args) -> ExperimentConfig:
    experiment, overrides = args.experiment, list(args.overrides)
    if experiment is not None and "=" in experiment:  # `gptforge run pretrain.max_steps=5`
        overrides.insert(0, experiment)
        experiment = None
    if experiment is None and Path(DEFAULT_EXPERIMENT).exists():
        experiment = DEFAULT_EXPERIMENT
    return load_config(experiment, overrides)


# --------------------------------------------------------------------- run


def _run(args) -> int:
    from pipelines import ray_runtime, serving
    from pipelines.llm_pipeline import run_pipeline
    from pipelines.progress import Progress

    cfg = _load(args)
    progress = Progress()
    started = time.perf_counter()
    progress.say(f"gptforge: experiment {cfg.name!r}, workdir {Path(cfg.workdir).resolve()}")
    ray_runtime.init_ray(cfg.ray_num_cpus)
    try:
        result = run_pipeline(cfg, progress)
        progress.say("")
        progress.say(candidate_table(result.reports, result.decision.winner.name))
        verdict = "became champion" if result.decision.promote else "registered, champion unchanged"
        progress.say(f"\n{result.decision.winner.name} -> {result.model_name} v{result.version}: {verdict}")
        progress.say(f"  why: {result.decision.reason}")
        progress.say(f"MLflow run: {result.run_id}  ({result.tracking_uri})")
        progress.say(f"total time: {time.perf_counter() - started:.0f}s")
        if args.serve:
            loader = serving.RegistryLoader(result.tracking_uri, result.model_name, _serving_cache(cfg))
            _serve_forever(loader, cfg, progress)
        else:
            progress.say("serve it with: gptforge serve" + (f" {args.experiment}" if args.experiment else ""))
    finally:
        ray_runtime.shutdown_ray()
    return 0


def candidate_table(reports: list, winner: str) -> str:
    """The candidates side by side: the numbers a person compares before trusting a promotion."""
    from components.comparison import candidate_table as table

    return table(reports, winner)


# ------------------------------------------------------------------- serve


def _serve(args) -> int:
    from pipelines import ray_runtime, serving
    from pipelines.progress import Progress
    from pipelines.tracking import find_alias, resolve_tracking_uri

    cfg = _load(args)
    tracking_uri = resolve_tracking_uri(cfg.workdir)
    # Fail here, with a plain message, when nothing was promoted yet (not inside a Serve replica).
    find_alias(tracking_uri, cfg.name, args.alias)
    ray_runtime.init_ray(cfg.ray_num_cpus)
    try:
        loader = serving.RegistryLoader(tracking_uri, cfg.name, _serving_cache(cfg), args.alias)
        _serve_forever(loader, cfg, Progress())
    finally:
        ray_runtime.shutdown_ray()
    return 0


def _serving_cache(cfg: ExperimentConfig) -> str:
    return str(Path(cfg.workdir).resolve() / "serving")


def _serve_forever(loader, cfg: ExperimentConfig, progress) -> None:
    from pipelines import serving

    progress.stage("deploy (Ray Serve)")
    url = serving.deploy(loader, cfg.serve)
    progress.done()
    progress.say(f"Serving at {url}  (POST {url}/v1/completions, GET {url}/healthz); Ctrl-C to stop")
    progress.say(f"  try: curl -s {url}/v1/completions -H 'Content-Type: application/json' "
                 "-d '{\"prompt\": \"def add(a, b):\", \"max_tokens\": 32}'")
    try:
        while True:
            time.sleep(3600)
    finally:
        serving.shutdown()


# -------------------------------------------------------------------- runs


def _runs(args) -> int:
    from pipelines.tracking import list_runs, resolve_tracking_uri

    cfg = _load(args)
    tracking_uri = resolve_tracking_uri(cfg.workdir)
    runs = list_runs(tracking_uri, cfg.name)
    if not runs:
        print(f"no runs of experiment {cfg.name!r} in {tracking_uri}")
        return 0
    print(f"{'run id':<34} {'status':<9} {'started':<20} data fingerprint")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.info.start_time / 1000))
        print(f"{r.info.run_id:<34} {r.info.status:<9} {started:<20} {r.data.tags.get('data.fingerprint', '')[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

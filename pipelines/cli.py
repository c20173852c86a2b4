"""The `gptforge` command line.

User errors (a bad experiment file, an empty corpus, nothing promoted yet, an
unreachable tracking server, a champion whose files fail their check) print one
message and exit 2 without a traceback; bugs keep their traceback. Whatever is
printed goes through `redact`, so no tracking-URI password or token reaches it.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path

from components.config import ConfigError, ExperimentConfig, load_config
from components.data import DataError
from components.files import IntegrityError
from pipelines.serving import ServeError
from pipelines.tracking import TrackingError, redact

DEFAULT_EXPERIMENT = "experiments/tiny.yaml"
USER_ERRORS = (ConfigError, DataError, LookupError, ServeError, TrackingError, IntegrityError)


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
            print(f"gptforge: error: {redact(str(cause))}", file=sys.stderr)
            return 2
        sys.stderr.write(redact(traceback.format_exc()))  # a bug: the whole traceback, less any secret
        return 1


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
    run.add_argument("--resume", nargs="?", const="latest", default=None, metavar="RUN_ID",
                     help="continue an interrupted run (the newest unfinished one, or RUN_ID) with its own config: "
                          "finished stages are reused, training continues from its last checkpoint")
    run.set_defaults(handler=_run)

    serve = sub.add_parser(
        "serve", help="serve the experiment's current champion on Ray Serve (POST /v1/completions)",
        description="Load the registered model's `champion` version from MLflow and answer "
                    "POST /v1/completions, GET /v1/models and GET /healthz until Ctrl-C.",
    )
    _experiment_args(serve)
    serve.add_argument("--alias", default="champion", help="registry alias to serve (default: champion)")
    serve.set_defaults(handler=_serve)

    promote = sub.add_parser(
        "promote", help="make a registered version champion (if it beats the champion), or roll back",
        description="Champion/challenger by hand: --version N replaces the registry's `champion` only if N "
                    "beats it under the experiment's promote: policy (--force skips the comparison); "
                    "--rollback points `champion` back at `previous`. The decision goes on the version's "
                    "tags, and a running `gptforge serve` switches to the new champion within "
                    "serve.poll_interval_s, without dropping a request. Exit status 3: the challenger lost.",
    )
    _experiment_args(promote)
    which = promote.add_mutually_exclusive_group(required=True)
    which.add_argument("--version", metavar="N", help="registered version to promote")
    which.add_argument("--rollback", action="store_true", help="champion <- previous (previous <- the old champion)")
    promote.add_argument("--force", action="store_true", help="with --version: promote without comparing")
    promote.set_defaults(handler=_promote)

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

    resume = None
    if args.resume is not None:
        cfg, resume = _interrupted_run(args)
    else:
        cfg = _load(args)
    _check_gpus(cfg)
    progress = Progress()
    started = time.perf_counter()
    progress.say(f"gptforge: experiment {cfg.name!r}, workdir {Path(cfg.workdir).resolve()}")
    ray_runtime.init_ray(cfg.ray_num_cpus)
    try:
        result = run_pipeline(cfg, progress, resume)
        progress.say("")
        progress.say(candidate_table(result.reports, result.decision.winner.name))
        verdict = "became champion" if result.decision.promote else "registered, champion unchanged"
        progress.say(f"\n{result.decision.winner.name} -> {result.model_name} v{result.version}: {verdict}")
        progress.say(f"  why: {result.decision.reason}")
        progress.say(f"MLflow run: {result.run_id}  ({redact(result.tracking_uri)})")
        progress.say(f"total time: {time.perf_counter() - started:.0f}s")
        if args.serve:
            loader = serving.RegistryLoader(result.tracking_uri, result.model_name, _serving_cache(cfg))
            loader.fetch()  # download and check the champion here, where a refusal reads plainly
            _serve_forever(loader, cfg, progress)
        else:
            progress.say("serve it with: gptforge serve" + (f" {args.experiment}" if args.experiment else ""))
    finally:
        ray_runtime.shutdown_ray()
    return 0


def _interrupted_run(args):
    """The config and MLflow record of the run that `--resume` continues."""
    import tempfile

    from pipelines.tracking import Tracker, resolve_tracking_uri

    run_id = args.resume
    if run_id != "latest" and not _looks_like_run_id(run_id):  # `run --resume experiments/x.yaml`
        args.overrides = [a for a in (args.experiment, *args.overrides) if a]
        args.experiment, run_id = run_id, "latest"
    # Only where to find the run may be given; everything else comes from the run itself.
    changed = [o for o in [args.experiment, *args.overrides] if o and "=" in o and not o.startswith("workdir=")]
    if changed:
        raise ConfigError(f"--resume continues a run with the config it started with; drop {' '.join(changed)} "
                          f"(only workdir=... may be given) or start a new run")
    cfg = _load(args)
    workdir = Path(cfg.workdir).resolve()
    tracker = Tracker(resolve_tracking_uri(cfg.workdir), cfg.name, artifact_location=str(workdir / "mlartifacts"))
    resume = tracker.interrupted_pipeline(None if run_id == "latest" else run_id)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(resume.experiment_yaml)
        f.flush()
        # The run's own config, with this invocation's workdir (where its store and checkpoints were found).
        return load_config(f.name, [f"workdir={cfg.workdir}"]), resume


def _looks_like_run_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _check_gpus(cfg: ExperimentConfig) -> None:
    """An embedded Ray on a machine without a GPU would wait forever for one: say so instead."""
    import os

    wants = [f"{s}.use_gpu" for s in ("pretrain", "finetune") if getattr(cfg, s).use_gpu]
    if wants and not os.environ.get("RAY_ADDRESS"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{', '.join(wants)}: true, but this machine has no CUDA GPU "
                              f"(set it to false, or point RAY_ADDRESS at a cluster with GPUs)")


def candidate_table(reports: list, winner: str) -> str:
    """The candidates side by side: the numbers a person compares before trusting a promotion."""
    from components.comparison import candidate_table as table

    return table(reports, winner)


# ------------------------------------------------------------------- serve


def _serve(args) -> int:
    from pipelines import ray_runtime, serving
    from pipelines.progress import Progress
    from pipelines.tracking import resolve_tracking_uri

    cfg = _load(args)
    tracking_uri = resolve_tracking_uri(cfg.workdir)
    loader = serving.RegistryLoader(tracking_uri, cfg.name, _serving_cache(cfg), args.alias)
    # Fail here, before Ray starts and with a plain message, when nothing was promoted yet, the
    # registry does not answer, or the champion's files do not match the registry's record.
    loader.fetch()
    ray_runtime.init_ray(cfg.ray_num_cpus)
    try:
        _serve_forever(loader, cfg, Progress())
    finally:
        ray_runtime.shutdown_ray()
    return 0


def _serving_cache(cfg: ExperimentConfig) -> str:
    return str(Path(cfg.workdir).resolve() / "serving")


def _serve_forever(loader, cfg: ExperimentConfig, progress) -> None:
    from pipelines import serving

    progress.stage("deploy (Ray Serve)")
    # An int4 champion runs on CUDA only: say so here rather than as a replica that fails to start.
    loader.fetch().check_device("cuda" if cfg.serve.num_gpus > 0 else "cpu")
    url = serving.deploy(loader, cfg.serve)
    progress.done()
    progress.say(f"Serving at {url}  (POST {url}/v1/completions, GET {url}/healthz); Ctrl-C to stop")
    progress.say(f"  try: curl -s {url}/v1/completions -H 'Content-Type: application/json' "
                 "-d '{\"prompt\": \"def add(a, b):\\n\", \"max_tokens\": 32, \"temperature\": 0}'")
    try:
        while True:
            time.sleep(3600)
    finally:
        serving.shutdown()


# ----------------------------------------------------------------- promote

PROMOTION_LOST = 3


def _promote(args) -> int:
    from pipelines import promotion
    from pipelines.tracking import Tracker, resolve_tracking_uri

    if args.force and args.rollback:
        raise ConfigError("--force goes with --version, not --rollback")
    if args.version is not None and not args.version.isdigit():
        raise ConfigError(f"--version: expected a registered version number, got {args.version!r}")
    cfg = _load(args)
    workdir = Path(cfg.workdir).resolve()
    tracker = Tracker(resolve_tracking_uri(cfg.workdir), cfg.name, artifact_location=str(workdir / "mlartifacts"))
    if args.rollback:
        new, old = promotion.rollback(tracker, cfg)
        print(f"{cfg.name}: champion is v{new} again (rolled back from v{old}; previous is now v{old})")
        return 0
    decision, outcome = promotion.promote_version(tracker, cfg, args.version, args.force)
    if outcome == "already":
        print(f"{cfg.name}: {decision.reason}; nothing changed")
        return 0
    if outcome == "promoted":
        print(f"{cfg.name}: v{args.version} is champion\n  why: {decision.reason}")
        return 0
    print(f"{cfg.name}: v{args.version} lost, champion unchanged\n  why: {decision.reason}")
    return PROMOTION_LOST


# -------------------------------------------------------------------- runs


def _runs(args) -> int:
    from pipelines.tracking import list_runs, resolve_tracking_uri

    cfg = _load(args)
    tracking_uri = resolve_tracking_uri(cfg.workdir)
    runs = list_runs(tracking_uri, cfg.name)
    if not runs:
        print(f"no runs of experiment {cfg.name!r} in {redact(tracking_uri)}")
        return 0
    print(f"{'run id':<34} {'status':<9} {'started':<20} data fingerprint")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.info.start_time / 1000))
        print(f"{r.info.run_id:<34} {r.info.status:<9} {started:<20} {r.data.tags.get('data.fingerprint', '')[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

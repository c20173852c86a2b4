"""The `gptforge` command line.

User errors (a bad experiment file, an empty corpus, nothing promoted yet, an
unreachable tracking server, a champion whose files fail their check) print one
message and exit 2 without a traceback; bugs keep their traceback. Whatever is
printed goes through `redact`, so no tracking-URI password or token reaches it.
The parser is here with the commands that work on this machine; the bodies of
the commands that go through a Ray job server are in pipelines/cli_jobs.py.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path

from components.experiment_file import ConfigError, ExperimentConfig, load_config
from components.files import IntegrityError
from components.sources import DataError
from components.storage import StorageError
from pipelines import cli_hf, cli_jobs, cli_signals, cli_suite
from pipelines.cli_experiment import DEFAULT_EXPERIMENT, load_experiment
from pipelines.jobs import JobError
from pipelines.schedule import MISSED_POLICIES, ScheduleError
from pipelines.serving import ServeError
from pipelines.tracking import TrackingError, redact

USER_ERRORS = (ConfigError, DataError, LookupError, ServeError, TrackingError, IntegrityError, JobError,
               ScheduleError, StorageError)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # argparse stops collecting `key=value` overrides at the first option (`run --no-cache x=1`);
    # the ones after it come back unknown and join the rest.
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        if not hasattr(args, "overrides") or not all("=" in u and not u.startswith("-") for u in unknown):
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *unknown]
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # `kill`, systemd, Docker and job schedulers send SIGTERM: end MLflow runs and Ray/Serve as on Ctrl-C.
    cli_signals.handle_signals()
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        if signum := cli_signals.terminated_by():
            print(f"\nstopped ({signal.Signals(signum).name})", file=sys.stderr)
            return 128 + signum  # as a shell reports a process the signal ended
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs below
        cause = getattr(error, "cause", None) or error  # a Ray task re-raises the task's exception as .cause
        if isinstance(cause, USER_ERRORS):
            print(f"gptforge: error: {redact(str(cause))}", file=sys.stderr)
            return 2
        sys.stderr.write(redact(traceback.format_exc()))  # a bug: the whole traceback, less any secret
        return 1


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
    run.add_argument("--no-cache", action="store_true",
                     help="recompute every stage, even one whose stage key has a finished output")
    run.add_argument("--run-name", default=None, help="MLflow name of the pipeline run (default: NAME-pipeline)")
    run.set_defaults(handler=_run)

    serve = sub.add_parser(
        "serve", help="serve the experiment's current champion on Ray Serve (POST /v1/completions)",
        description="Load the registered model's `champion` version from MLflow and answer "
                    "POST /v1/completions, GET /v1/models and GET /healthz until Ctrl-C.",
    )
    _experiment_args(serve)
    serve.add_argument("--alias", default="champion", help="registry alias to serve (default: champion)")
    serve.set_defaults(handler=_serve)

    submit = sub.add_parser(
        "submit", help="submit the pipeline to a Ray cluster as a Ray job",
        description="Send this project and the experiment to a Ray cluster's job server and run "
                    "`gptforge run` there. Prints the job id; with --follow, streams the job's output and "
                    "exits with its status. MLFLOW_TRACKING_URI is passed on to the job.",
    )
    _experiment_args(submit)
    _address_arg(submit, tracking=True)
    submit.add_argument("--follow", action="store_true", help="stream the job's output until it ends")
    submit.add_argument("--no-cache", action="store_true", help="recompute every stage (see `run --no-cache`)")
    submit.add_argument("--run-name", default=None, help="MLflow name of the pipeline run")
    submit.set_defaults(handler=cli_jobs.submit)

    jobs = sub.add_parser("jobs", help="list the Ray jobs of a cluster", description="List the cluster's Ray jobs, "
                          "newest first, with their status and the gptforge experiment they run.")
    _address_arg(jobs)
    jobs.set_defaults(handler=cli_jobs.list_jobs)

    logs = sub.add_parser("logs", help="print a Ray job's output", description="Print a Ray job's output so far; "
                          "with --follow, until it ends (exiting with its status).")
    logs.add_argument("job_id", metavar="ID")
    _address_arg(logs)
    logs.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    logs.set_defaults(handler=cli_jobs.logs)

    stop = sub.add_parser("stop", help="stop a Ray job", description="Ask the cluster to stop a Ray job.")
    stop.add_argument("job_id", metavar="ID")
    _address_arg(stop)
    stop.set_defaults(handler=cli_jobs.stop)

    schedule = sub.add_parser(
        "schedule", help="retrain on a cron schedule and/or when the data changes, as Ray jobs",
        description="A long-lived scheduler: each trigger (a cron slot, or a change of the data sources' "
                    "fingerprint) submits the pipeline as a Ray job with a fresh run name. A trigger while "
                    "a job of the experiment still runs is skipped. Every trigger is kept in "
                    "WORKDIR/schedule.db (--history prints it).",
    )
    _experiment_args(schedule)
    _address_arg(schedule, tracking=True)
    schedule.add_argument("--cron", default=None, metavar="EXPR",
                          help="cron expression, e.g. '0 3 * * *' (a sixth field, last, gives seconds)")
    schedule.add_argument("--timezone", default="UTC", help="IANA time zone the cron is read in (default: UTC)")
    schedule.add_argument("--on-new-data", action="store_true",
                          help="also run when the fingerprint of data.source / finetune.source changes")
    schedule.add_argument("--poll", type=float, default=60.0, metavar="SECONDS",
                          help="how often --on-new-data reads the sources (default: 60)")
    schedule.add_argument("--missed", choices=MISSED_POLICIES, default="run_once",
                          help="a slot missed while the scheduler was down: run it once (default) or skip it")
    schedule.add_argument("--history", action="store_true", help="print the trigger history and exit")
    schedule.set_defaults(handler=cli_jobs.schedule)

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
    cli_hf.add_commands(sub)
    cli_suite.add_commands(sub, _experiment_args)
    return parser


def _experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", default=None, metavar="EXPERIMENT",
                        help=f"experiment YAML (default: {DEFAULT_EXPERIMENT} if present, else built-in defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. pretrain.max_steps=50 quantize.variants=[fp32,bf16]")


def _address_arg(parser: argparse.ArgumentParser, tracking: bool = False) -> None:
    parser.add_argument("--address", default=None,
                        help="the cluster's job server, http://HOST:8265 (default: RAY_ADDRESS, else the local head)")
    if tracking:
        parser.add_argument("--tracking-uri", default=None,
                            help="MLflow tracking server as the job sees it (default: MLFLOW_TRACKING_URI; on a local "
                                 "head, the experiment's local store)")


# --------------------------------------------------------------------- run


def _run(args) -> int:
    from components.comparison import candidate_table
    from pipelines.llm_pipeline import run_pipeline
    from pipelines.model_loading import RegistryLoader
    from pipelines.progress import Progress

    resume = None
    if args.resume is not None:
        cfg, resume = _interrupted_run(args)
    else:
        cfg = load_experiment(args)
    _check_gpus(cfg)
    progress = Progress()
    started = time.perf_counter()
    progress.say(f"gptforge: experiment {cfg.name!r}, workdir {Path(cfg.workdir).resolve()}")
    try:
        cli_signals.start_ray(cfg.ray_num_cpus)
        result = run_pipeline(cfg, progress, resume, use_cache=not args.no_cache, run_name=args.run_name)
        progress.say("")
        progress.say(candidate_table(result.reports, result.decision.winner.name))
        verdict = "became champion" if result.decision.promote else "registered, champion unchanged"
        progress.say(f"\n{result.decision.winner.name} -> {result.model_name} v{result.version}: {verdict}")
        progress.say(f"  why: {result.decision.reason}")
        progress.say(f"MLflow run: {result.run_id}  ({redact(result.tracking_uri)})")
        progress.say(f"total time: {time.perf_counter() - started:.0f}s")
        if args.serve:
            loader = RegistryLoader(result.tracking_uri, result.model_name, _serving_cache(cfg))
            loader.fetch()  # download and check the champion here, where a refusal reads plainly
            _serve_forever(loader, cfg, progress)
        else:
            progress.say("serve it with: gptforge serve" + (f" {args.experiment}" if args.experiment else ""))
    finally:
        cli_signals.stop_ray()
    return 0


def _interrupted_run(args):
    """The config and MLflow record of the run that `--resume` continues."""
    import tempfile

    from pipelines.cli_experiment import absolute_folders
    from pipelines.run_queries import interrupted_pipeline
    from pipelines.tracking import Tracker

    run_id = args.resume
    if run_id != "latest" and not _looks_like_run_id(run_id):  # `run --resume experiments/x.yaml`
        args.overrides = [a for a in (args.experiment, *args.overrides) if a]
        args.experiment, run_id = run_id, "latest"
    # Only where to find the run may be given; everything else comes from the run itself.
    changed = [o for o in [args.experiment, *args.overrides] if o and "=" in o and not o.startswith("workdir=")]
    if changed:
        raise ConfigError(f"--resume continues a run with the config it started with; drop {' '.join(changed)} "
                          f"(only workdir=... may be given) or start a new run")
    cfg = load_experiment(args)
    resume = interrupted_pipeline(Tracker.for_experiment(cfg), None if run_id == "latest" else run_id)
    # The run goes on writing where it started (the workdir and storage it recorded), not into the
    # default workdir of whatever folder this command runs in; an explicit workdir= moves it.
    moved = any(o and o.startswith("workdir=") for o in [args.experiment, *args.overrides])
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(resume.experiment_yaml)
        f.flush()
        resumed = absolute_folders(load_config(f.name, [f"workdir={cfg.workdir}"] if moved else []))
    storage = f", storage {redact(resumed.storage)}" if resumed.storage else ""
    print(f"gptforge: resuming run {resume.run_id} in workdir {resumed.workdir}{storage} "
          f"({'given by workdir=' if moved else 'the one it started with'})", flush=True)
    return resumed, resume


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


# ------------------------------------------------------------------- serve


def _serve(args) -> int:
    from pipelines.model_loading import RegistryLoader
    from pipelines.progress import Progress
    from pipelines.tracking import resolve_tracking_uri

    cfg = load_experiment(args)
    tracking_uri = resolve_tracking_uri(cfg.workdir)
    loader = RegistryLoader(tracking_uri, cfg.name, _serving_cache(cfg), args.alias)
    # Fail here, before Ray starts and with a plain message, when nothing was promoted yet, the
    # registry does not answer, or the champion's files do not match the registry's record.
    loader.fetch()
    try:
        cli_signals.start_ray(cfg.ray_num_cpus)
        _serve_forever(loader, cfg, Progress())
    finally:
        cli_signals.stop_ray()
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
    from pipelines.tracking import Tracker

    if args.force and args.rollback:
        raise ConfigError("--force goes with --version, not --rollback")
    if args.version is not None and not args.version.isdigit():
        raise ConfigError(f"--version: expected a registered version number, got {args.version!r}")
    cfg = load_experiment(args)
    tracker = Tracker.for_experiment(cfg)
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
    from pipelines.run_queries import list_runs
    from pipelines.tracking import resolve_tracking_uri

    cfg = load_experiment(args)
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

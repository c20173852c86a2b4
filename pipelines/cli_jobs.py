"""The `gptforge` commands that go through a Ray cluster's job server: submit, jobs, logs, stop, schedule."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from pipelines.cli_experiment import experiment_and_overrides, load_experiment
from pipelines.tracking import redact


def _send_ray_token() -> None:
    """`ray start` clusters of Ray 2.60 want a token, and Ray's job client sends one only under
    RAY_AUTH_MODE=token, which Ray reads once, when first imported. The job commands start no
    Ray of their own, so the whole process may say so; the library (pipelines/jobs.py) leaves
    os.environ alone, as a Ray started later by the same process would inherit it."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")


def submit(args) -> int:
    """`gptforge submit`: the pipeline sent to the cluster as a Ray job; with --follow, the job's status."""
    _send_ray_token()
    from pipelines import jobs

    cfg = load_experiment(args)  # a bad experiment fails here, not minutes later on the cluster
    address = jobs.resolve_address(args.address)
    experiment, overrides, env = jobs.pipeline_job(*experiment_and_overrides(args), cfg.workdir, address,
                                                   args.tracking_uri)
    job_id = jobs.submit(address, experiment, overrides, experiment_name=cfg.name, env=env,
                         run_name=args.run_name, no_cache=args.no_cache)
    print(f"submitted job {job_id} to {redact(address)}", flush=True)
    if not args.follow:
        print(f"follow it with: gptforge logs {job_id} --follow" + (f" --address {redact(address)}" if args.address else ""))
        return 0
    return _follow(job_id, address)


def _follow(job_id: str, address: str) -> int:
    from pipelines import jobs

    try:
        final = jobs.follow(job_id, address)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (gptforge stop {job_id} ends it)", file=sys.stderr)
        return 130
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def list_jobs(args) -> int:
    """`gptforge jobs`: the cluster's Ray jobs, newest first."""
    _send_ray_token()
    from pipelines import jobs

    listed = jobs.list_jobs(args.address)
    if not listed:
        print(f"no jobs at {redact(jobs.resolve_address(args.address))}")
        return 0
    print(f"{'job id':<36} {'status':<10} {'started':<20} {'experiment':<14} entrypoint")
    for j in listed:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.start_time)) if j.start_time else ""
        print(f"{j.job_id:<36} {j.status:<10} {started:<20} {j.experiment:<14} {redact(j.entrypoint)[:60]}")
    return 0


def logs(args) -> int:
    """`gptforge logs ID`: a job's output so far; with --follow, until it ends."""
    _send_ray_token()
    from pipelines import jobs

    if args.follow:
        return _follow(args.job_id, args.address)
    sys.stdout.write(jobs.logs(args.job_id, args.address))
    return 0


def stop(args) -> int:
    """`gptforge stop ID`: ask the cluster to stop a job."""
    _send_ray_token()
    from pipelines import jobs

    if jobs.stop(args.job_id, args.address):
        print(f"job {args.job_id}: stop requested")
    else:
        print(f"job {args.job_id}: already ended ({jobs.status(args.job_id, args.address)})")
    return 0


# ---------------------------------------------------------------- schedule

def schedule(args) -> int:
    """`gptforge schedule`: the pipeline submitted on every trigger until stopped (--history: the past ones)."""
    _send_ray_token()
    from pipelines import jobs, stages
    from pipelines.schedule import History, JobTemplate, ScheduleError, Scheduler, check_cron

    if args.cron:
        check_cron(args.cron, args.timezone)  # before the experiment is loaded: a typo fails at once
    cfg = load_experiment(args)
    workdir = Path(cfg.workdir).resolve()
    history = History(workdir / "schedule.db")
    if args.history:
        return _print_history(history, cfg.name)
    if not args.cron and not args.on_new_data:
        raise ScheduleError("give --cron EXPR, --on-new-data, or both (or --history to see past triggers)")
    address = jobs.resolve_address(args.address)
    experiment, overrides, env = jobs.pipeline_job(*experiment_and_overrides(args), cfg.workdir, address,
                                                   args.tracking_uri)
    template = JobTemplate(cfg.name, experiment, tuple(overrides), env, address)
    fingerprint = (lambda: stages.source_fingerprint(cfg)) if args.on_new_data else None
    scheduler = Scheduler(template, history, workdir / f"schedule-{cfg.name}.lock", cron=args.cron,
                          tz_name=args.timezone, fingerprint=fingerprint, poll_s=args.poll, missed=args.missed,
                          say=lambda m: print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {m}", flush=True))
    jobs.client(address)  # an unreachable job server fails now, not at the first trigger
    print(f"gptforge schedule: experiment {cfg.name!r} -> jobs at {redact(address)}; history in {history.path}", flush=True)
    scheduler.run_forever()
    return 0


def _print_history(history, experiment: str) -> int:
    rows = history.triggers(experiment)
    if not rows:
        print(f"no triggers of experiment {experiment!r} in {history.path}")
        return 0
    print(f"{'fired at (UTC)':<20} {'kind':<9} {'slot / fingerprint':<26} {'outcome':<10} {'job id':<44} "
          f"{'job status':<10} detail")
    for t in rows:
        print(f"{t.fired_at[:19]:<20} {t.kind:<9} {t.slot[:25]:<26} {t.outcome:<10} {t.job_id or '':<44} "
              f"{t.job_status or '':<10} {redact(t.detail)}")  # rows written before details were redacted
    return 0

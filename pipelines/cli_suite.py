"""`gptforge suite`: show the experiment's evaluation suite, or pin another one on purpose.

The suite is what every candidate and the champion are judged on (components/suite.py); the
record of which one is pinned lives on the MLflow experiment (pipelines/suites.py). Changing it
is never silent: `pin` needs a reason, which goes on the record and on a `suite-pin` run.
"""
from __future__ import annotations


def add_commands(sub, experiment_args) -> None:
    """Add `suite show` and `suite pin` to the `gptforge` subparsers `sub`."""
    suite = sub.add_parser(
        "suite", help="show or re-pin the evaluation suite every candidate and the champion are judged on",
        description="The evaluation suite: held-out documents and pairs that no run trains on. The first "
                    "pipeline run of an experiment pins one from its own held-out side; every later run "
                    "measures its candidates and the champion on it (eval/suite_bpb, the task items).")
    actions = suite.add_subparsers(dest="suite_action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the suite the experiment is judged on")
    experiment_args(show)
    show.set_defaults(handler=show_command)
    pin = actions.add_parser(
        "pin", help="make another suite the experiment's (say why with --reason)",
        description="Pin FOLDER as the experiment's evaluation suite: a suite folder (suite.json), or a data "
                    "stage's output folder (its held-out documents and pairs are copied into "
                    "{storage}/suites/). The reason goes on the MLflow experiment and on a suite-pin run. Later "
                    "runs keep the suite's documents and pairs out of their training data.")
    pin.add_argument("folder", metavar="FOLDER", help="suite folder or data stage output (path or storage URI)")
    pin.add_argument("--reason", required=True, help="why the suite changes (goes on the record)")
    experiment_args(pin)
    pin.set_defaults(handler=pin_command)


def show_command(args) -> int:
    from pipelines import suites
    from pipelines.cli_experiment import load_experiment
    from pipelines.tracking import Tracker, redact

    cfg = load_experiment(args)
    tracker = Tracker.for_experiment(cfg)
    suite = suites.current(tracker, cfg)
    if suite is None:
        print(f"{cfg.name}: no evaluation suite yet; the next pipeline run pins one from its held-out side")
        return 0
    tags = tracker.experiment_tags()
    source = "evaluate.suite in the experiment file" if cfg.evaluate.suite else (
        f"pinned {tags.get(suites.PINNED_AT_TAG, '?')}: {tags.get(suites.REASON_TAG, '')}")
    print(f"{cfg.name}: suite {suite.sha256}\n  at {redact(suite.uri)}\n  {len(suite.documents)} documents, "
          f"{len(suite.pairs)} pairs\n  {source}")
    return 0


def pin_command(args) -> int:
    from components.experiment_file import ConfigError
    from pipelines import suites
    from pipelines.cli_experiment import load_experiment
    from pipelines.llm_pipeline import storage_root
    from pipelines.tracking import Tracker, redact

    cfg = load_experiment(args)
    if cfg.evaluate.suite:
        raise ConfigError(f"evaluate.suite={cfg.evaluate.suite} in the experiment file overrides the pinned suite; "
                          "remove it to use `gptforge suite pin`, or set it to the new folder instead")
    try:
        suite = suites.pin(Tracker.for_experiment(cfg), args.folder, storage_root(cfg), args.reason)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    print(f"{cfg.name}: evaluation suite is now {suite.sha256}\n  at {redact(suite.uri)} ({len(suite.documents)} "
          f"documents, {len(suite.pairs)} pairs)\n  reason: {args.reason}")
    return 0

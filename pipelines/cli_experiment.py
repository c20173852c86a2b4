"""Which experiment a command's EXPERIMENT and key=value arguments name, and loading it."""
from __future__ import annotations

from pathlib import Path

from components.experiment_file import ExperimentConfig, load_config

DEFAULT_EXPERIMENT = "experiments/tiny.yaml"


def load_experiment(args) -> ExperimentConfig:
    """The experiment that `args.experiment` and `args.overrides` name, loaded and checked."""
    return load_config(*experiment_and_overrides(args))


def experiment_and_overrides(args) -> tuple[str | None, list[str]]:
    """The experiment file (DEFAULT_EXPERIMENT when none is given and it exists) and the overrides."""
    experiment, overrides = args.experiment, list(args.overrides)
    if experiment is not None and "=" in experiment:  # `gptforge run pretrain.max_steps=5`
        overrides.insert(0, experiment)
        experiment = None
    if experiment is None and Path(DEFAULT_EXPERIMENT).exists():
        experiment = DEFAULT_EXPERIMENT
    return experiment, overrides

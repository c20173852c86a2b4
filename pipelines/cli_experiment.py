"""Which experiment a command's EXPERIMENT and key=value arguments name, and loading it."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from components.experiment_file import ConfigError, ExperimentConfig, load_config
from components.storage import normalize

DEFAULT_EXPERIMENT = "experiments/tiny.yaml"


def load_experiment(args) -> ExperimentConfig:
    """The experiment that `args.experiment` and `args.overrides` name, loaded and checked.

    Its workdir (and a local `storage`) is made absolute here, so the config that a run records
    names the same folders whichever folder a later `gptforge run --resume` starts from.
    """
    return absolute_folders(load_config(*experiment_and_overrides(args)))


def absolute_folders(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with its workdir, and its storage when that is a local path, made absolute (a URI is kept)."""
    try:
        storage = normalize(cfg.storage) if cfg.storage else ""
    except RuntimeError as error:  # `~someone/...` for a user this machine does not know
        raise ConfigError(f"storage: {cfg.storage!r}: {error}") from None
    return dataclasses.replace(cfg, workdir=str(Path(cfg.workdir).resolve()), storage=storage)


def experiment_and_overrides(args) -> tuple[str | None, list[str]]:
    """The experiment file (DEFAULT_EXPERIMENT when none is given and it exists) and the overrides."""
    experiment, overrides = args.experiment, list(args.overrides)
    if experiment is not None and "=" in experiment:  # `gptforge run pretrain.max_steps=5`
        overrides.insert(0, experiment)
        experiment = None
    if experiment is None and Path(DEFAULT_EXPERIMENT).exists():
        experiment = DEFAULT_EXPERIMENT
    return experiment, overrides

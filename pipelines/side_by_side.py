"""Measure a registered model beside the candidates: same held-out text, same code, same settings.

The champion a challenger is compared with is downloaded from the registry (its files
checked against the sha256 pinned at registration), loaded, and measured with
`components.bpb.bpb_metrics` on the challenger's held-out data, and on the experiment's evaluation
suite (`components.suite`) with the tasks of `evaluate.tasks` (`components.lm_eval_model.task_metrics`,
the same items), each model with its own tokenizer; the numbers go to a run of their own
(`champion-reeval`). So the decision
never compares a fresh number with one logged long ago on other data.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

from components import storage
from components.artifacts import TokenizedData
from components.experiment_file import ExperimentConfig
from components.files import IntegrityError
from components.suite import Suite
from components.tokenizer import tokenizer_hash
from pipelines import registry, suites
from pipelines.model_loading import FolderLoader, RegistryLoader, fetch_version
from pipelines.registry import CHAMPION
from pipelines.serving import ServeError
from pipelines.tracking import RunLogger, Tracker

REEVAL_RUN = "champion-reeval"


@dataclass(frozen=True)
class Measured:
    """A registered version measured here: its side-by-side metrics, or why it could not be measured."""

    name: str  # "v3"
    version: str
    metrics: dict
    note: str  # how it differs from the data it was measured on (other data, another tokenizer)
    failed: str = ""  # empty, or why it could not be loaded or measured


def measure_champion(tracker: Tracker, cfg: ExperimentConfig, data: TokenizedData,
                     parent: RunLogger | None, suite: Suite | None = None) -> Measured | None:
    """The current champion re-evaluated on `data`'s held-out text and on the evaluation `suite`,
    logged as `champion-reeval` in `parent`.

    Returns None when there is no champion. A champion whose files fail their check, or that
    cannot run here, comes back with `failed` set (never an exception): the caller decides.

    Raises:
        TrackingError: the registry failed.
    """
    current = registry.alias_version(tracker.tracking_uri, cfg.name, CHAMPION)
    if current is None:
        return None
    with tempfile.TemporaryDirectory(prefix="gptforge-champion-") as cache:
        return _measure(tracker, cfg, data, parent, REEVAL_RUN, current,
                        lambda: RegistryLoader(tracker.tracking_uri, cfg.name, cache).fetch(), suite)


def measure_version(tracker: Tracker, cfg: ExperimentConfig, data: TokenizedData, parent: RunLogger | None,
                    version, suite: Suite | None = None) -> Measured:
    """A registered version (an mlflow ModelVersion) measured on `data`, as `measure_champion` does."""
    with tempfile.TemporaryDirectory(prefix="gptforge-version-") as cache:
        return _measure(tracker, cfg, data, parent, f"v{version.version}-reeval", version,
                        lambda: _version_loader(tracker.tracking_uri, cfg.name, version, cache), suite)


def _measure(tracker: Tracker, cfg: ExperimentConfig, data: TokenizedData, parent: RunLogger | None,
             run_name: str, version, fetch, suite: Suite | None) -> Measured:
    import torch
    from tokenizers import Tokenizer

    from components import quantize as quantize_lib
    from components.bpb import bpb_metrics, suite_bpb_metrics
    from components.lm_eval_model import task_metrics
    from components.model import WEIGHTS_FILE

    name = f"v{version.version}"
    with tracker.run(run_name, parent, stage="champion-reeval") as log:
        log.set_tags({"reeval.version": str(version.version), "reeval.run_id": version.run_id or "",
                      "data.fingerprint": data.fingerprint, suites.VERSION_TAG: suite.sha256 if suite else "",
                      "reeval.data_fingerprint": version.tags.get("data.fingerprint", "")})
        try:
            loader = fetch()
            device = quantize_lib.pick_device(loader.precision(), cfg.evaluate.device, torch.cuda.is_available())
            loaded = loader(device)
            metrics = bpb_metrics(loaded.model, loaded.tokenizer, data, cfg.evaluate)
            judged_on = suite.view(data) if suite is not None else data
            if suite is not None:
                metrics |= suite_bpb_metrics(loaded.model, loaded.tokenizer, judged_on, cfg.evaluate)
            metrics |= task_metrics(loaded.model, loaded.tokenizer, judged_on, cfg.evaluate)  # the same task items
        except (IntegrityError, ServeError, quantize_lib.VariantUnavailable, OSError, ValueError) as why:
            log.set_tags({"reeval.status": "failed", "reeval.error": str(why)[:4000]})
            return Measured(name, str(version.version), {}, "", failed=str(why))
        metrics["model/size_bytes"] = float(os.path.getsize(os.path.join(loader.folder, WEIGHTS_FILE)))
        same_tokenizer = tokenizer_hash(loaded.tokenizer) == tokenizer_hash(
            Tokenizer.from_str(storage.read_text(data.tokenizer_uri)))
        log.log_metrics(metrics)
        log.set_tags({"reeval.status": "measured", "reeval.device": device,
                      "reeval.same_tokenizer": str(same_tokenizer).lower()})
    differs = [what for what, same in (("on other data", version.tags.get("data.fingerprint") == data.fingerprint),
                                       ("with another tokenizer", same_tokenizer)) if not same]
    note = (f"{name} was trained {' and '.join(differs)}; it takes part, measured on the same held-out text "
            f"(bits per byte compares across tokenizers)") if differs else ""
    return Measured(name, str(version.version), metrics, note)


def _version_loader(tracking_uri: str, model_name: str, version, cache_dir: str) -> FolderLoader:
    """A registered version's files, downloaded and checked against the sha256 pinned on it."""
    return fetch_version(tracking_uri, model_name, version, cache_dir, purpose="measure")

"""Which evaluation suite an experiment is judged on, and the record of every pin.

The suite itself is `components/suite.py`. Here: where the experiment's current suite is
recorded (tags on its MLflow experiment, so every run, the scheduler and `gptforge promote`
find the same one), the first pin (a pipeline run of an experiment with no suite pins its
own held-out documents and pairs), and re-pinning on purpose (`gptforge suite pin`, with a
reason). Every pin is also a `suite-pin` run of its own (in the pipeline run for the first pin),
so the history is in the MLflow UI.

`evaluate.suite` overrides the record: a suite folder given in the experiment file is used
as is and never written to the record.
"""
from __future__ import annotations

import json
import time

from components import storage
from components.artifacts import TokenizedData
from components.experiment_file import ExperimentConfig
from components.suite import SUITE_FILE, Suite, pin_from_data, read_suite
from pipelines.tracking import RunLogger, Tracker

URI_TAG = "gptforge.suite.uri"
SHA_TAG = "gptforge.suite.sha256"
REASON_TAG = "gptforge.suite.reason"
PINNED_AT_TAG = "gptforge.suite.pinned_at"
VERSION_TAG = "eval.suite_sha256"  # on a registered version and a run: the suite it was judged on
VERSION_URI_TAG = "eval.suite_uri"
PIN_RUN = "suite-pin"


def current(tracker: Tracker, cfg: ExperimentConfig) -> Suite | None:
    """The suite this experiment's runs are judged on: `evaluate.suite`, else the pinned one, else None.

    Raises:
        DataError: the suite's files are missing or changed since it was pinned.
    """
    if cfg.evaluate.suite:
        return read_suite(cfg.evaluate.suite)
    uri = tracker.experiment_tags().get(URI_TAG)
    return read_suite(uri) if uri else None


def judged_on(suite: Suite) -> dict:
    """The tags that say which suite a run or a registered version was judged on."""
    return {VERSION_TAG: suite.sha256, VERSION_URI_TAG: suite.uri}


def suites_root(root: str) -> str:
    """Where an experiment's suites are stored: `{storage}/suites/<sha256>/`."""
    return storage.join(root, "suites")


def pin_first(tracker: Tracker, data: TokenizedData, root: str, parent: RunLogger, data_key: str,
              params: dict) -> Suite:
    """The first run's held-out documents and pairs, pinned as the experiment's suite (its `suite-pin`
    run nested in the pipeline run `parent`, with the run's `params` as every stage run has them)."""
    suite = pin_from_data(data, suites_root(root), origin=f"run {parent.run_id}", data_key=data_key)
    record(tracker, suite, f"first run of the experiment: the held-out side of run {parent.run_id}", parent, params)
    return suite


def pin(tracker: Tracker, location: str, root: str, reason: str) -> Suite:
    """Pin the suite at `location` (a suite folder, or a data stage's output folder) as the experiment's.

    A data stage's output is copied into `{storage}/suites/` first; a suite folder is used where it is.

    Raises:
        DataError: the folder is neither, or its files do not match their record.
        ValueError: `reason` is empty.
    """
    if not reason.strip():
        raise ValueError("--reason: say why the suite changes; it goes on the record")
    location = storage.normalize(location)
    if storage.exists(storage.join(location, SUITE_FILE)):
        suite = read_suite(location)
    else:
        suite = pin_from_data(_data_folder(location), suites_root(root), origin=location)
    record(tracker, suite, reason)
    return suite


def record(tracker: Tracker, suite: Suite, reason: str, parent: RunLogger | None = None,
           params: dict | None = None) -> None:
    """Make `suite` the experiment's, with `reason`, and log the pin as a `suite-pin` run (in `parent`)."""
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    tracker.set_experiment_tags({URI_TAG: suite.uri, SHA_TAG: suite.sha256, REASON_TAG: reason[:4000],
                                 PINNED_AT_TAG: at})
    with tracker.run(PIN_RUN, parent, stage=PIN_RUN, params=params) as log:
        log.set_tags({"suite.uri": suite.uri, "suite.sha256": suite.sha256, "suite.reason": reason[:4000],
                      "suite.documents": str(len(suite.documents)), "suite.pairs": str(len(suite.pairs))})


def change_note(suite: Suite, champion_tags: dict) -> str:
    """What the decision says when the champion was judged on another suite before ("" when not)."""
    before = champion_tags.get(VERSION_TAG, "")
    if before == suite.sha256:
        return ""
    was = f"suite {before[:12]}" if before else "no pinned suite"
    return (f"evaluation suite changed since the champion was registered (it was judged on {was}; both are "
            f"measured now on suite {suite.short})")


def _data_folder(location: str) -> TokenizedData:
    """A data stage's output folder read back as its record (the files a suite is made of)."""
    from components.data import MANIFEST_FILE, data_record
    from components.documents import DataError

    manifest_uri = storage.join(location, MANIFEST_FILE)
    if not storage.exists(manifest_uri):
        raise DataError(f"{location}: neither a suite (no suite.json) nor a data stage's output (no {MANIFEST_FILE})")
    return data_record(location, json.loads(storage.read_text(manifest_uri)))

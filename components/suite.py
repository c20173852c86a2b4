"""The evaluation suite: the held-out material every candidate and the champion are judged on.

A run's own held-out split changes with its data, so numbers measured on it do not compare
across runs. The suite stays put: the first run of an experiment pins one (its held-out
documents and pairs, which it never trained on), and every later run, whatever its data,
measures its candidates and the champion on that same suite. Its documents and pairs are
kept out of every later run's training side (`components.data_plan` routes them to val,
`components.data` to the held-out pairs).

A suite is a folder, local or on storage, named after its content:

    heldout_text.jsonl    documents as text, {"doc_id", "text", "sha"} a line (sha: the
                          whole document's content hash, hex)
    sft_heldout.parquet   held-out pairs as tokens and mask (as the data stage writes them)
    tokenizer.json        the tokenizer that reads those tokens back into text
    suite.json            the content hashes of its documents and pairs, where it came from

Its identity (`Suite.sha256`) is the sha256 over the three data files' hashes, so two
suites with the same material are the same suite wherever they are stored.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from components import storage
from components.artifacts import TokenizedData
from components.documents import DataError
from components.heldout_text import HELDOUT_TEXT_FILE
from components.tokenizer import TOKENIZER_FILE

SUITE_FILE = "suite.json"
SFT_HELDOUT_FILE = "sft_heldout.parquet"
DATA_FILES = (HELDOUT_TEXT_FILE, SFT_HELDOUT_FILE, TOKENIZER_FILE)


@dataclass(frozen=True)
class Suite:
    """A suite as the pipeline uses it.

    Attributes:
        uri: the folder holding its files.
        sha256: its identity (the three data files' hashes, hashed).
        documents: content hashes of its documents (raw 32-byte sha256).
        pairs: content hashes of its pairs (`sft.Pair.text` / `Conversation.text`, hashed).
        data_key: the data stage's cache key it was pinned from ("" when given by hand): a run
            with that same key already holds the suite on its held-out side, so keeping the
            suite out of its training data changes nothing and its cache entry still holds.
    """

    uri: str
    sha256: str
    documents: frozenset = frozenset()
    pairs: frozenset = frozenset()
    data_key: str = ""

    def view(self, data: TokenizedData) -> TokenizedData:
        """`data` with its held-out text, pairs and tokenizer replaced by the suite's: what
        `components.bpb.bpb_metrics` and the task benchmarks read."""
        return dataclasses.replace(
            data, heldout_text_uri=storage.join(self.uri, HELDOUT_TEXT_FILE),
            sft_heldout_uri=storage.join(self.uri, SFT_HELDOUT_FILE), tokenizer_uri=storage.join(self.uri, TOKENIZER_FILE))

    @property
    def short(self) -> str:
        return self.sha256[:12]


def pin_from_data(data: TokenizedData, suites_root: str, origin: str, data_key: str = "") -> Suite:
    """Copy `data`'s held-out documents and pairs into `suites_root/<sha256>/` as a suite.

    Args:
        data: a data stage's output (its held-out side was never trained on).
        suites_root: where the experiment's suites live (`{storage}/suites`).
        origin: what it came from, for the record (a run id, a folder).
        data_key: that data stage's cache key.

    Raises:
        DataError: `data` has no held-out text file (written by an older data stage) or no
            pair hashes in its manifest.
    """
    if not data.heldout_text_uri:
        raise DataError(f"{data.root}: written before the data stage kept its held-out text; run the data stage "
                        "again to pin a suite from it")
    manifest = json.loads(storage.read_text(data.manifest_uri))
    if "sft_heldout_sha256" not in manifest:
        raise DataError(f"{data.manifest_uri}: lists no held-out pair hashes (an older data stage); run it again")
    sources = {HELDOUT_TEXT_FILE: data.heldout_text_uri, SFT_HELDOUT_FILE: data.sft_heldout_uri,
               TOKENIZER_FILE: data.tokenizer_uri}
    contents = {name: storage.read_bytes(uri) for name, uri in sources.items()}
    sha = _identity(contents)
    location = storage.join(suites_root, sha)
    documents = [line["sha"] for line in _lines(contents[HELDOUT_TEXT_FILE]) if "#" not in line["doc_id"]]
    record = {"sha256": sha, "origin": origin, "data_key": data_key, "documents_sha256": sorted(documents),
              "pairs_sha256": sorted(manifest["sft_heldout_sha256"]),
              "files": {name: hashlib.sha256(raw).hexdigest() for name, raw in contents.items()}}
    if storage.exists(storage.join(location, SUITE_FILE)):  # content-addressed: pinned before; check it is whole
        return read_suite(location)
    for name, raw in contents.items():
        storage.write_bytes(storage.join(location, name), raw)
    storage.write_bytes(storage.join(location, SUITE_FILE), (json.dumps(record, indent=2) + "\n").encode())
    return _suite(location, sha, record)


def read_suite(location: str) -> Suite:
    """The suite in `location`, its files checked against its record.

    Raises:
        DataError: a file missing or changed since the suite was pinned, naming it.
    """
    location = storage.normalize(location)
    record_uri = storage.join(location, SUITE_FILE)
    if not storage.exists(record_uri):
        raise DataError(f"evaluation suite {location}: no {SUITE_FILE} there; give a folder that `gptforge suite "
                        "pin` or a pipeline run wrote (under {storage}/suites/)")
    try:
        record = json.loads(storage.read_text(record_uri))
        files = record["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{record_uri}: not a suite record ({error})") from None
    contents = {}
    for name in DATA_FILES:
        uri = storage.join(location, name)
        if not storage.exists(uri):
            raise DataError(f"{uri}: missing from the evaluation suite")
        contents[name] = storage.read_bytes(uri)
        if hashlib.sha256(contents[name]).hexdigest() != files.get(name):
            raise DataError(f"{uri}: changed since the suite was pinned (sha256 differs from {SUITE_FILE}); "
                            "pin a new suite on purpose with `gptforge suite pin` instead of editing one")
    return _suite(location, _identity(contents), record)


def _suite(location: str, sha256: str, record: dict) -> Suite:
    return Suite(location, sha256, frozenset(bytes.fromhex(h) for h in record["documents_sha256"]),
                 frozenset(bytes.fromhex(h) for h in record["pairs_sha256"]), record.get("data_key", ""))


def _identity(contents: dict[str, bytes]) -> str:
    return hashlib.sha256("".join(f"{name}:{hashlib.sha256(contents[name]).hexdigest()}\n"
                                  for name in DATA_FILES).encode()).hexdigest()


def _lines(raw: bytes) -> list[dict]:
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]

"""Stage inputs and outputs: small frozen records that point at files, never tensors.

Every stage returns one of these so that a Ray task can hand it to the next stage
cheaply, and so the pipeline can log where each artifact lives.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenizedData:
    """Output of `prepare_data`.

    Attributes:
        root: folder holding everything below.
        train_uri / val_uri: parquet files of packed pretraining rows. Column
            `tokens` (list<int32>, length block_size + 1).
        sft_train_uri / sft_heldout_uri: parquet files of tokenized
            prompt/completion pairs. Columns `tokens` (list<int32>, length
            block_size + 1, right-padded) and `mask` (list<int8>, 1 where the
            token is a completion token that the loss is taken on).
        tokenizer_uri: `tokenizer.json` of the trained byte-level BPE.
        manifest_uri: `manifest.json` with the counts below and more.
        fingerprint: sha256 over the corpus content and the data config.
        vocab_size: size of the trained tokenizer's vocabulary.
        block_size: model context length the rows were packed for.
        stats: documents, tokens, rows per split, sft pairs (for logging).
        heldout_text_uri: `heldout_text.jsonl`, the validation documents as raw text
            (bits per byte reads them with each model's own tokenizer); empty in
            records written before the data stage wrote it.
    """

    root: str
    train_uri: str
    val_uri: str
    sft_train_uri: str
    sft_heldout_uri: str
    tokenizer_uri: str
    manifest_uri: str
    fingerprint: str
    vocab_size: int
    block_size: int
    stats: dict = field(default_factory=dict)
    heldout_text_uri: str = ""


@dataclass(frozen=True)
class Checkpoint:
    """A model folder: `model.safetensors` + `config.json` (+ `tokenizer.json`)."""

    uri: str
    step: int
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class QuantizedModel:
    """One candidate: a model folder stored in its variant's dtype.

    `skipped` is empty, or why the variant could not be built here (then `uri` is empty).
    """

    variant: str
    uri: str
    size_bytes: int
    skipped: str = ""


@dataclass(frozen=True)
class EvalReport:
    """Metrics of one candidate under the shared metric names, plus samples.

    `generations` maps each fixed prompt (evaluate.prompts) to the candidate's greedy
    continuation. `skipped` is empty, or why the candidate was not measured (no metrics).
    """

    variant: str
    metrics: dict
    samples: list = field(default_factory=list)
    generations: dict = field(default_factory=dict)
    skipped: str = ""


_RECORD_TYPES = {cls.__name__: cls for cls in (TokenizedData, Checkpoint, QuantizedModel, EvalReport)}


def to_json(record) -> str:
    """A stage record as JSON that `from_json` turns back into the same record."""
    return json.dumps({"type": type(record).__name__, "fields": dataclasses.asdict(record)}, sort_keys=True)


def from_json(text: str):
    data = json.loads(text)
    return _RECORD_TYPES[data["type"]](**data["fields"])

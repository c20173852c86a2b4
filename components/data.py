"""Data stage: corpus -> byte-level BPE tokenizer -> packed rows + SFT pairs on disk.

`prepare_data` is the stage; its steps live in `components.sources` (reading the
corpus), `components.tokenizer`, `components.packing` (rows on disk) and
`components.sft` (supervised pairs).

Layout written into `out_dir` (manifest.json last, so its presence means the
rest is complete):

    tokenizer.json        byte-level BPE, `<|endoftext|>` at id 0
    train.parquet         column `tokens`: list<int32>, length block_size + 1
    val.parquet           same
    sft_train.parquet     columns `tokens` list<int32>, `mask` list<int8>
    sft_heldout.parquet   same
    manifest.json         counts, config, fingerprint
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Callable

from components.artifacts import TokenizedData
from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.files import atomic_write
from components.packing import pack_rows, write_rows
from components.sft import extract_function_pairs, tokenize_pairs
from components.sources import DataError, Document, document_split, fingerprint, iter_documents, iter_sft_documents
from components.tokenizer import EOT, EOT_ID, MIN_VOCAB_SIZE, TOKENIZER_FILE, train_tokenizer

# Bump when the on-disk format or the processing changes, so old fingerprints
# stop matching.
_FORMAT_VERSION = 1

_MANIFEST_FILE = "manifest.json"


def prepare_data(
    out_dir: str,
    data: DataConfig,
    tokenizer: TokenizerConfig,
    finetune: FinetuneConfig,
    progress: Callable[[str], None] | None = None,
) -> TokenizedData:
    """Turn a corpus into a tokenizer, packed pretraining rows and SFT rows.

    Args:
        out_dir: folder to write into (created if needed).
        data: the pretraining corpus (see `components.sources.iter_documents`), its
            block size and validation share.
        tokenizer: the BPE vocabulary size (at least MIN_VOCAB_SIZE).
        finetune: its source, max_bytes, max_pairs and heldout_fraction give the
            supervised pairs (see `components.sft.extract_function_pairs`); the rest is unused.
        progress: called with short human-readable status lines.

    Returns:
        TokenizedData with absolute paths, the fingerprint and the counts.

    Raises:
        DataError: invalid settings (all reported at once), an empty corpus,
            a corpus too small for block_size, or too few SFT pairs.
    """
    say = progress or (lambda msg: None)
    _validate(data, tokenizer, finetune)
    block_size = data.block_size
    # The names and their order are those of the manifest and the fingerprint: changing them
    # changes every fingerprint.
    config = dict(source=data.source, text_field=data.text_field, max_bytes=data.max_bytes, block_size=block_size,
                  val_fraction=data.val_fraction, vocab_size=tokenizer.vocab_size, sft_source=finetune.source,
                  sft_max_bytes=finetune.max_bytes, sft_max_pairs=finetune.max_pairs,
                  sft_heldout_fraction=finetune.heldout_fraction)

    # Read and split the corpus.
    docs = list(iter_documents(data.source, text_field=data.text_field, max_bytes=data.max_bytes))
    if not docs:
        raise DataError(
            f"no documents found in data.source={data.source}: expected non-empty .txt/.md/.py files in a folder, "
            f"objects with a {data.text_field!r} string in a .jsonl file, or a {data.text_field!r} column in a "
            ".parquet file"
        )
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    say(f"read {len(docs)} documents ({n_bytes / 1e6:.1f} MB) from {data.source}")
    train_docs, val_docs = _split_documents(docs, data.val_fraction)

    # Tokenizer from train only, so val measures generalisation of the whole pipeline.
    bpe = train_tokenizer((d.text for d in train_docs), tokenizer.vocab_size)
    say(f"trained tokenizer ({bpe.get_vocab_size()} tokens)")

    splits = {}
    for name, split_docs in (("train", train_docs), ("val", val_docs)):
        ids = [e.ids for e in bpe.encode_batch([d.text for d in split_docs], add_special_tokens=False)]
        rows = pack_rows(ids, block_size)
        splits[name] = (split_docs, sum(len(x) + 1 for x in ids), rows)  # +1: the EOT after each document
        say(f"{name}: {len(split_docs)} documents, {splits[name][1]} tokens, {len(rows)} rows")
    _check_rows(splits, block_size)

    # Supervised pairs, split per pair so both sides see every kind of file.
    pairs = extract_function_pairs(finetune.source, max_bytes=finetune.max_bytes, max_pairs=finetune.max_pairs)
    sft_split = {"train": [], "val": []}
    for p in pairs:
        sft_split[document_split(p.doc_id + p.prompt, finetune.heldout_fraction)].append(p)
    sft = {
        "sft_train": tokenize_pairs(sft_split["train"], bpe, block_size),
        "sft_heldout": tokenize_pairs(sft_split["val"], bpe, block_size),
    }
    _check_pairs(sft, len(pairs), finetune.source)
    say(f"sft: {len(sft['sft_train'][0])} train, {len(sft['sft_heldout'][0])} heldout pairs "
        f"(of {len(pairs)} extracted)")

    fp = fingerprint(
        [*docs, *(Document(f"sft:{p.doc_id}", p.prompt + "\0" + p.completion) for p in pairs)],
        format_version=_FORMAT_VERSION, **config,
    )
    stats = {
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_tokens": splits["train"][1],
        "val_tokens": splits["val"][1],
        "train_rows": len(splits["train"][2]),
        "val_rows": len(splits["val"][2]),
        "sft_pairs_extracted": len(pairs),
        "sft_train_pairs": len(sft["sft_train"][0]),
        "sft_heldout_pairs": len(sft["sft_heldout"][0]),
    }

    # Write: drop any old manifest first so an interrupted rerun never looks complete.
    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / _MANIFEST_FILE
    manifest_path.unlink(missing_ok=True)
    paths = {name: root / f"{name}.parquet" for name in ("train", "val", "sft_train", "sft_heldout")}
    tokenizer_path = root / TOKENIZER_FILE
    atomic_write(tokenizer_path, lambda tmp: bpe.save(str(tmp)))
    for name in ("train", "val"):
        write_rows(paths[name], splits[name][2])
    for name, (tokens, mask) in sft.items():
        write_rows(paths[name], tokens, mask)
    manifest = {
        "source": data.source,
        "sft_source": finetune.source,
        "fingerprint": fp,
        "format_version": _FORMAT_VERSION,
        "vocab_size": bpe.get_vocab_size(),
        "block_size": block_size,
        "tokenizer": TOKENIZER_FILE,
        "eot_token": EOT,
        "eot_id": EOT_ID,
        "files": {name: p.name for name, p in paths.items()},
        "stats": stats,
        "config": config,
    }
    atomic_write(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    say(f"wrote {root}")

    return TokenizedData(
        root=str(root),
        train_uri=str(paths["train"]),
        val_uri=str(paths["val"]),
        sft_train_uri=str(paths["sft_train"]),
        sft_heldout_uri=str(paths["sft_heldout"]),
        tokenizer_uri=str(tokenizer_path),
        manifest_uri=str(manifest_path),
        fingerprint=fp,
        vocab_size=bpe.get_vocab_size(),
        block_size=block_size,
        stats=stats,
    )


def source_fingerprint(data: DataConfig, finetune: FinetuneConfig) -> str:
    """sha256 over the documents `prepare_data` would read (the corpus and the SFT source), without tokenizing.

    It changes when a file of a source folder is added, removed or edited (within the
    `max_bytes` subsets), so it keys the data stage's cache and the new-data trigger.
    Reading costs about as much as the sources' size on disk.

    Raises:
        DataError: a missing path or an unsupported file type, as `iter_documents` says.
    """
    docs = iter_documents(data.source, text_field=data.text_field, max_bytes=data.max_bytes)
    sft = (Document(f"sft:{d.doc_id}", d.text) for d in iter_sft_documents(finetune.source, finetune.max_bytes))
    # Streamed, one document at a time: the corpus is never all in memory.
    return fingerprint(itertools.chain(docs, sft), format_version=_FORMAT_VERSION, text_field=data.text_field)


def _validate(data: DataConfig, tokenizer: TokenizerConfig, finetune: FinetuneConfig) -> None:
    """Report every bad setting at once, by its experiment-config key."""
    problems = []
    if data.block_size < 2:
        problems.append(f"data.block_size={data.block_size}: must be at least 2")
    if not 0 < data.val_fraction < 1:
        problems.append(f"data.val_fraction={data.val_fraction}: must be between 0 and 1 (exclusive)")
    if not 0 < finetune.heldout_fraction < 1:
        problems.append(f"finetune.heldout_fraction={finetune.heldout_fraction}: must be between 0 and 1 (exclusive)")
    if tokenizer.vocab_size < MIN_VOCAB_SIZE:
        problems.append(f"tokenizer.vocab_size={tokenizer.vocab_size}: must be at least {MIN_VOCAB_SIZE} "
                        f"(256 bytes + {EOT})")
    for key, value in (("data.max_bytes", data.max_bytes), ("finetune.max_bytes", finetune.max_bytes),
                       ("finetune.max_pairs", finetune.max_pairs)):
        if value < 0:
            problems.append(f"{key}={value}: must be >= 0 (0 means no limit)")
    if problems:
        raise DataError("invalid data settings:\n  " + "\n  ".join(problems))


def _split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Hash split; tiny corpora whose hash split leaves val empty fall back to a tail split."""
    train = [d for d in docs if document_split(d.doc_id, val_fraction) == "train"]
    val = [d for d in docs if document_split(d.doc_id, val_fraction) == "val"]
    if val and train:
        return train, val
    if len(docs) >= 2:
        n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
        return docs[:-n_val], docs[-n_val:]
    # One document (say, a single big .txt): cut its text on a line boundary.
    doc = docs[0]
    cut = int(len(doc.text) * (1 - val_fraction))
    line_start = doc.text.rfind("\n", 0, cut) + 1
    cut = line_start if line_start > 0 else cut
    return [Document(f"{doc.doc_id}#train", doc.text[:cut])], [Document(f"{doc.doc_id}#val", doc.text[cut:])]


def _check_rows(splits: dict, block_size: int) -> None:
    empty = [name for name, (_, _, rows) in splits.items() if len(rows) == 0]
    if empty:
        detail = ", ".join(f"{name} has {splits[name][1]} tokens" for name in empty)
        raise DataError(
            f"corpus too small for data.block_size={block_size}: {detail}, but a row needs {block_size + 1}; "
            "add text, lower data.block_size, or raise data.val_fraction"
        )


def _check_pairs(sft: dict, n_extracted: int, sft_source: str) -> None:
    counts = {name: len(tokens) for name, (tokens, _) in sft.items()}
    if counts["sft_train"] < 1 or counts["sft_heldout"] < 1:
        raise DataError(
            f"finetune.source={sft_source}: {n_extracted} pairs extracted, {counts['sft_train']} train and "
            f"{counts['sft_heldout']} heldout after tokenizing (pairs whose prompt fills more than half a row are "
            "skipped); need at least one of each. Add documented functions (or prompt/completion lines), "
            "raise data.block_size, or adjust finetune.heldout_fraction"
        )

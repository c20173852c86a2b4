"""Data stage: corpus -> byte-level BPE tokenizer -> packed row shards + SFT pairs at a location.

`prepare_data` drives the stage: it lists the sources, runs the passes of
`components.data_passes` over groups of files through `map_items` (in this process by
default; Ray Data in the pipeline, `pipelines/data_prep.py`), decides what to keep on the
driver (`components.data_plan`), and writes the rest. Reading the corpus is
`components.sources`, the tokenizer `components.tokenizer`, rows on disk
`components.packing`, supervised pairs `components.sft`.

Layout written at `location`, a local folder or a storage URI (manifest.json last, so its
presence means the rest is complete):

    tokenizer.json        byte-level BPE, `<|endoftext|>` at id 0
    train/part-*.parquet  column `tokens`: list<uint16> (uint32 past 65,536 ids), block_size + 1 long
    val/part-*.parquet    same
    sft_train.parquet     columns `tokens` (same type), `mask` list<int8>
    sft_heldout.parquet   same
    tokenizer_config.json with finetune.format=chat: the chat template (`chat_template`, as transformers keeps it)
    heldout_text.jsonl    the first MiB of the val documents as raw text (components/heldout_text.py)
    manifest.json         documents read/kept/dropped and why, tokens and bytes per split,
                          the tokenizer's hash, the input fingerprint
"""
from __future__ import annotations

import itertools
import json
from functools import partial
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from components import storage
from components.artifacts import TokenizedData
from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.data_passes import (PACK_SCHEMA, SAMPLE_SCHEMA, SCAN_SCHEMA, group_files, pack_group, read_group,
                                    sample_group, scan_group, scan_items)
from components.data_plan import Plan, plan_routing
from components.documents import SPLITS, ProblemLog, content_hash
from components.heldout_text import HELDOUT_SCHEMA, HELDOUT_TEXT_FILE, write_heldout_text
from components.packing import row_dtype, write_rows
from components.chat import CHAT_TOKENS, CHATML_TEMPLATE, TOKENIZER_CONFIG_FILE, save_chat_template
from components.sft import (add_chat_tokens, extract_conversations, extract_function_pairs, tokenize_conversations,
                            tokenize_pairs)
from components.sources import (DataError, Document, document_split, fingerprint, iter_documents, iter_sft_documents,
                                list_source)
from components.suite import Suite
from components.tokenizer import (EOT, MIN_VOCAB_SIZE, TOKENIZER_FILE, eot_id, load_tokenizer, tokenizer_hash,
                                  train_tokenizer)

# Bump when the on-disk format or the processing changes, so old fingerprints stop matching.
_FORMAT_VERSION = 2

MANIFEST_FILE = "manifest.json"
_MAX_FATAL_SHOWN = 10

MapItems = Callable[[Callable[[dict], pa.Table], list[dict]], list[pa.Table]]
"""Runs a pass over every item and returns the tables it made (in any order)."""


def map_in_process(fn: Callable[[dict], pa.Table], items: list[dict]) -> list[pa.Table]:
    """`MapItems` in this process, one item after another."""
    return [fn(item) for item in items]


def _run(map_items: MapItems, fn: Callable[[dict], pa.Table], items: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.concat_tables([schema.empty_table(), *(t.select(schema.names).cast(schema) for t in map_items(fn, items))])


def prepare_data(location: str, data: DataConfig, tokenizer: TokenizerConfig, finetune: FinetuneConfig,
                 progress: Callable[[str], None] | None = None, map_items: MapItems = map_in_process,
                 suite: Suite | None = None) -> TokenizedData:
    """Turn a corpus into a tokenizer, packed pretraining rows and SFT rows at `location`.

    Args:
        location: local folder or storage URI to write into (created if needed).
        data: the pretraining corpus (see `components.sources.list_source`), its policies for
            bad input, block size and validation share.
        tokenizer: the BPE vocabulary size and sample, or a tokenizer.json to use.
        finetune: its source, max_bytes, max_pairs and heldout_fraction give the
            supervised pairs (see `components.sft.extract_function_pairs`); the rest is unused.
        progress: called with short human-readable status lines.
        map_items: how the passes run over the groups of files (`MapItems`).
        suite: the experiment's evaluation suite: its documents go to val and its pairs to the
            held-out side, so no run ever trains on what it is judged on.

    Returns:
        TokenizedData: `root` is `location`; train_uri and val_uri are folders of shards.

    Raises:
        DataError: invalid settings (all reported at once), an empty source, a fatal problem
            in a file (each named, file:line), a corpus too small for block_size, or too few
            SFT pairs.
    """
    say = progress or (lambda msg: None)
    _validate(data, tokenizer, finetune)
    location = storage.normalize(location)
    config = _config(data, tokenizer, finetune)

    # Scan: every document's hash and size, and every problem, in parallel.
    files = list_source(data.source)
    items = group_files(files)
    scan = _run(map_items, partial(scan_group, data=data), scan_items(files), SCAN_SCHEMA)
    problems = _problems(scan["problems"])
    meta = scan.filter(pc.is_valid(scan["doc_id"])).select(["doc_id", "sha", "nbytes"])
    if meta.num_rows == 0:
        raise DataError(f"no documents found in data.source={data.source}: expected non-empty .txt/.md/.py files, "
                        f"objects with a {data.text_field!r} string in .jsonl files, or a {data.text_field!r} "
                        f"column in .parquet files{_problem_summary(problems)}")
    say(f"read {meta.num_rows} documents ({pc.sum(meta['nbytes']).as_py() / 1e6:.1f} MB) from {data.source} "
        f"in {len(items)} groups{_problem_summary(problems)}")
    plan = plan_routing(meta, data, tokenizer, partial(_text_of, items, data),
                        held_out=suite.documents if suite else frozenset())
    say(f"kept {meta.num_rows - plan.duplicates - plan.outside_subset} documents: {plan.duplicates} exact "
        f"duplicates dropped" + (f", {plan.outside_subset} outside data.max_bytes" if data.max_bytes else ""))

    bpe = _tokenizer(tokenizer, data, plan, items, map_items, finetune)
    say(f"{'loaded' if tokenizer.file else 'trained'} tokenizer ({bpe.get_vocab_size()} tokens"
        + ("" if tokenizer.file else f", on {plan.sample_documents} training documents") + ")")

    # Write: drop any old manifest and shards first so an interrupted rerun never looks complete.
    manifest_uri = storage.join(location, MANIFEST_FILE)
    _remove_old(location, manifest_uri)
    dtype = row_dtype(bpe.get_vocab_size())
    storage.write_bytes(storage.join(location, TOKENIZER_FILE), bpe.to_str().encode("utf-8"))
    packed = _run(map_items, partial(pack_group, data=data, routing=plan.routing, tokenizer_json=bpe.to_str(),
                                     dtype=dtype.name, out=location), items, PACK_SCHEMA)
    splits = _split_counts(packed, plan, data)
    for name in SPLITS:
        s = splits[name]
        say(f"{name}: {s['documents']} documents, {s['tokens']} tokens in {s['rows']} rows, {len(s['files'])} shards")

    heldout_text = write_heldout_text(location, _heldout_table(packed))
    sft, n_pairs, pair_docs, heldout_pairs = _write_sft(location, finetune, bpe, data.block_size, dtype,
                                                        suite.pairs if suite else frozenset())
    say(f"sft: {sft['sft_train']} train, {sft['sft_heldout']} heldout pairs (of {n_pairs} extracted)")

    fp = _input_fingerprint(meta, pair_docs, config)
    stats = _stats(plan, problems, splits, sft, n_pairs)
    manifest = {
        "source": data.source, "sft_source": finetune.source, "fingerprint": fp, "format_version": _FORMAT_VERSION,
        "vocab_size": bpe.get_vocab_size(), "block_size": data.block_size, "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": tokenizer_hash(bpe), "eot_token": EOT, "eot_id": eot_id(bpe), "token_dtype": dtype.name,
        "files": {name: {"train": "train/", "val": "val/"}.get(name, f"{name}.parquet")
                  for name in ("train", "val", "sft_train", "sft_heldout")} | {"heldout_text": HELDOUT_TEXT_FILE},
        "heldout_text": heldout_text,
        # Content hashes of the held-out pairs: what an evaluation suite pinned from this output keeps
        # out of later runs' training pairs (components/suite.py).
        "sft_heldout_sha256": heldout_pairs,
        "evaluation_suite": {"sha256": suite.sha256, "documents_sent_to_val": plan.suite_documents,
                             "pairs_sent_to_heldout": sft.get("suite_pairs", 0)} if suite else None,
        "documents": {"read": plan.documents_read, "kept": plan.documents_read - plan.duplicates - plan.outside_subset,
                      "dropped": {"duplicate": plan.duplicates, "outside_max_bytes": plan.outside_subset,
                                  **{k: v for k, v in problems.counts.items() if k.startswith("skipped_")}},
                      "replaced_bad_utf8": problems.counts.get("replaced_bad_utf8", 0)},
        "problems": problems.examples,
        "splits": splits, "stats": stats, "config": config,
    }
    storage.write_bytes(manifest_uri, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    say(f"wrote {location}")
    return data_record(location, manifest)


def data_record(location: str, manifest: dict) -> TokenizedData:
    """The record of the stage's output at `location`, from its manifest (as written, or read back)."""
    return TokenizedData(
        root=location, train_uri=storage.join(location, "train"), val_uri=storage.join(location, "val"),
        sft_train_uri=storage.join(location, "sft_train.parquet"),
        sft_heldout_uri=storage.join(location, "sft_heldout.parquet"),
        tokenizer_uri=storage.join(location, TOKENIZER_FILE), manifest_uri=storage.join(location, MANIFEST_FILE),
        fingerprint=manifest["fingerprint"], vocab_size=manifest["vocab_size"], block_size=manifest["block_size"],
        stats=manifest["stats"], heldout_text_uri=storage.join(location, HELDOUT_TEXT_FILE),
    )


def source_fingerprint(data: DataConfig, finetune: FinetuneConfig) -> str:
    """sha256 over the documents `prepare_data` would read (the corpus and the SFT source), without tokenizing.

    It changes when a file of a source folder is added, removed or edited (within the
    `max_bytes` subsets), so it keys the data stage's cache and the new-data trigger.
    Reading costs about as much as the sources' size on disk, in this process.

    Raises:
        DataError: a missing path, an unsupported file type or a fatal problem in a file.
    """
    docs = iter_documents(data.source, text_field=data.text_field, max_bytes=data.max_bytes,
                          on_bad_utf8=data.on_bad_utf8, on_bad_json=data.on_bad_json)
    sft = (Document(f"sft:{d.doc_id}", d.text) for d in iter_sft_documents(finetune.source, finetune.max_bytes))
    # Streamed, one file at a time: the corpus is never all in memory.
    return fingerprint(itertools.chain(docs, sft), format_version=_FORMAT_VERSION, text_field=data.text_field)


def _config(data: DataConfig, tokenizer: TokenizerConfig, finetune: FinetuneConfig) -> dict:
    # The names and their order are those of the manifest and the fingerprint: changing them
    # changes every fingerprint.
    return dict(source=data.source, text_field=data.text_field, max_bytes=data.max_bytes, block_size=data.block_size,
                val_fraction=data.val_fraction, on_bad_utf8=data.on_bad_utf8, on_bad_json=data.on_bad_json,
                vocab_size=tokenizer.vocab_size, tokenizer_sample_bytes=tokenizer.sample_bytes,
                tokenizer_file=tokenizer.file, sft_source=finetune.source, sft_max_bytes=finetune.max_bytes,
                sft_max_pairs=finetune.max_pairs, sft_heldout_fraction=finetune.heldout_fraction,
                sft_format=finetune.format)


def _problems(column: pa.ChunkedArray) -> ProblemLog:
    """The problems of every group; the fatal ones stop the stage, all named at once."""
    log = ProblemLog()
    for text in column.drop_null().to_pylist():
        log.merge(ProblemLog.from_json(text))
    if log.fatal:
        shown = log.fatal[:_MAX_FATAL_SHOWN]
        more = len(log.fatal) - len(shown)
        raise DataError("the data source has problems:\n  " + "\n  ".join(shown)
                        + (f"\n  ... and {more} more" if more else ""))
    return log


def _problem_summary(problems: ProblemLog) -> str:
    counted = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(problems.counts.items()))
    return f" ({counted})" if counted else ""


def _text_of(items: list[dict], data: DataConfig, doc_id: str) -> str:
    """One document's text, read in this process (the single-document corpus that is cut in two)."""
    for item in items:
        for doc in read_group(item, data)[0]:
            if doc.doc_id == doc_id:
                return doc.text
    raise DataError(f"data.source={data.source}: {doc_id} vanished since it was scanned; run the stage again")


def _tokenizer(tokenizer: TokenizerConfig, data: DataConfig, plan: Plan, items: list[dict], map_items: MapItems,
               finetune: FinetuneConfig):
    if tokenizer.file is not None and finetune.init_from:  # the starting model's: its EOT keeps its own id
        return load_tokenizer(tokenizer.file, f"finetune.init_from={finetune.init_from!r}: tokenizer",
                              required_eot_id=None)
    if tokenizer.file is not None:
        return load_tokenizer(tokenizer.file)
    # Sorted by doc_id: the sample's texts reach the trainer in the same order however the passes ran.
    sample = _run(map_items, partial(sample_group, data=data, routing=plan.routing), items, SAMPLE_SCHEMA)
    sample = sample.sort_by("doc_id")
    # Tokenizer from train only, so val measures generalisation of the whole pipeline.
    return train_tokenizer(iter(sample["text"].to_pylist()), tokenizer.vocab_size)


def _heldout_table(packed: pa.Table) -> pa.Table:
    """The validation texts every group's pack returned, as one (doc_id, text) table."""
    val = packed.filter(pc.equal(packed["split"], "val"))
    ids = list(itertools.chain.from_iterable(x or [] for x in val["heldout_ids"].to_pylist()))
    texts = list(itertools.chain.from_iterable(x or [] for x in val["heldout_texts"].to_pylist()))
    return pa.table({"doc_id": ids, "text": texts}, schema=HELDOUT_SCHEMA)


def _remove_old(location: str, manifest_uri: str) -> None:
    storage.delete_file(manifest_uri)
    for split in SPLITS:
        storage.delete_folder(storage.join(location, split))


def _split_counts(packed: pa.Table, plan: Plan, data: DataConfig) -> dict[str, dict]:
    """Per split: documents, bytes, tokens in the shards (rows x (block_size + 1)), the packing tails, the files."""
    _problems(packed["problems"])  # a file that became unreadable since the scan
    out = {}
    for split in SPLITS:
        part = packed.filter(pc.equal(packed["split"], split))
        rows = int(pc.sum(part["rows"]).as_py() or 0)
        document_tokens = int(pc.sum(part["document_tokens"]).as_py() or 0)
        tokens = rows * (data.block_size + 1)
        out[split] = {"documents": int(pc.sum(part["documents"]).as_py() or 0),
                      "bytes": int(pc.sum(part["bytes"]).as_py() or 0), "rows": rows, "tokens": tokens,
                      "document_tokens": document_tokens, "tail_tokens_dropped": document_tokens - tokens,
                      "files": sorted(f for f in part["file"].to_pylist() if f)}
        if out[split]["documents"] != plan.split_documents[split]:
            raise DataError(f"data.source={data.source}: the files changed while they were read ({split}: "
                            f"{plan.split_documents[split]} documents when scanned, {out[split]['documents']} when "
                            "packed); run the stage again")
    empty = [s for s in SPLITS if out[s]["rows"] == 0]
    if empty:
        detail = ", ".join(f"{s} has {out[s]['document_tokens']} tokens" for s in empty)
        raise DataError(
            f"corpus too small for data.block_size={data.block_size}: {detail}, but a row needs "
            f"{data.block_size + 1}; add text, lower data.block_size, or raise data.val_fraction"
        )
    return out


def _write_sft(location: str, finetune: FinetuneConfig, bpe, block_size: int, dtype,
               held_out: frozenset = frozenset()) -> tuple[dict, int, list, list[str]]:
    """Supervised examples, split per example so both sides see every kind of file (small: one process).

    With `finetune.format: chat` the chat tokens are added to `bpe` (ids after the trained
    vocabulary, `sft.add_chat_tokens`), tokenizer.json is written again with them, and the
    ChatML template is stored beside it as tokenizer_config.json for the fine-tuned model.
    The pretraining rows, tokenized before, never hold those ids. Examples whose content hash
    is in `held_out` (the evaluation suite's) go to the held-out side whatever their split says.

    Returns:
        (the rows per side and the chat counts, the examples extracted, their documents for the
        fingerprint, the content hashes (hex) of the held-out examples)
    """
    chat = finetune.format == "chat"
    extract = extract_conversations if chat else extract_function_pairs
    examples = extract(finetune.source, max_bytes=finetune.max_bytes, max_pairs=finetune.max_pairs)
    if chat:
        _write_chat_tokenizer(location, bpe, dtype)
    else:
        _remove_chat_template(location)
    sides = {"sft_train": [], "sft_heldout": []}
    in_suite = 0
    for p in examples:
        forced = content_hash(p.text) in held_out
        in_suite += forced
        side = "val" if forced else document_split(p.split_key, finetune.heldout_fraction)
        sides["sft_heldout" if side == "val" else "sft_train"].append(p)
    if chat:
        rows = {name: tokenize_conversations(side, bpe, block_size, CHATML_TEMPLATE) for name, side in sides.items()}
    else:
        rows = {name: (*tokenize_pairs(side, bpe, block_size), {}) for name, side in sides.items()}
    counts = {name: len(tokens) for name, (tokens, _, _) in rows.items()}
    if counts["sft_train"] < 1 or counts["sft_heldout"] < 1:
        skipped = ("conversations with no assistant token inside a row are dropped" if chat else
                   "pairs whose prompt fills more than half a row are skipped")
        raise DataError(
            f"finetune.source={finetune.source}: {len(examples)} {'conversations' if chat else 'pairs'} extracted, "
            f"{counts['sft_train']} train and {counts['sft_heldout']} heldout after tokenizing ({skipped}); need at "
            "least one of each. Add documented functions (or prompt/completion lines, or conversations), "
            "raise data.block_size, or adjust finetune.heldout_fraction"
        )
    for name, (tokens, mask, _) in rows.items():
        write_rows(storage.join(location, f"{name}.parquet"), tokens.astype(dtype), mask)
    for kind in ("truncated", "dropped") if chat else ():  # the conversations cut at the block or left out
        counts[f"conversations_{kind}"] = sum(c[kind] for _, _, c in rows.values())
    if held_out:
        counts["suite_pairs"] = in_suite
    pair_docs = [Document(f"sft:{p.doc_id}", p.text) for p in examples]
    return counts, len(examples), pair_docs, [content_hash(p.text).hex() for p in sides["sft_heldout"]]


def _write_chat_tokenizer(location: str, bpe, dtype) -> None:
    add_chat_tokens(bpe)
    if row_dtype(bpe.get_vocab_size()) != dtype:
        raise DataError(f"tokenizer.vocab_size: {bpe.get_vocab_size()} tokens with the chat tokens no longer fit the "
                        f"rows' {dtype.name} ids; lower tokenizer.vocab_size by {len(CHAT_TOKENS)}")
    storage.write_bytes(storage.join(location, TOKENIZER_FILE), bpe.to_str().encode("utf-8"))
    save_chat_template(location, CHATML_TEMPLATE)


def _remove_chat_template(location: str) -> None:
    """A pairs run over a folder that held a chat run: its template must not reach this run's model."""
    storage.delete_file(storage.join(location, TOKENIZER_CONFIG_FILE))


def _input_fingerprint(meta: pa.Table, pair_docs: list[Document], config: dict) -> str:
    """sha256 over every document read (doc_id and content hash, in doc_id order), the pairs and the config."""
    meta = meta.sort_by("doc_id")
    docs = (Document(d, s.hex()) for d, s in zip(meta["doc_id"].to_pylist(), meta["sha"].to_pylist()))
    return fingerprint(itertools.chain(docs, pair_docs), format_version=_FORMAT_VERSION, **config)


def _stats(plan: Plan, problems: ProblemLog, splits: dict, sft: dict, n_pairs: int) -> dict:
    """The numbers the stage logs as metrics (`data/<name>`); the manifest holds the same and more."""
    stats = {"documents_read": plan.documents_read, "duplicates_dropped": plan.duplicates}
    for split in SPLITS:
        s = splits[split]
        stats |= {f"{split}_documents": s["documents"], f"{split}_tokens": s["tokens"], f"{split}_rows": s["rows"],
                  f"{split}_bytes": s["bytes"], f"{split}_tail_tokens_dropped": s["tail_tokens_dropped"]}
    stats |= {f"problems_{kind}": n for kind, n in sorted(problems.counts.items())}
    stats |= {"sft_pairs_extracted": n_pairs, "sft_train_pairs": sft["sft_train"], "sft_heldout_pairs": sft["sft_heldout"]}
    stats |= {f"sft_{k}": n for k, n in sft.items() if k.startswith("conversations_")}  # chat: truncated, dropped
    if "suite_pairs" in sft:  # the evaluation suite's, kept on the held-out side
        stats |= {"suite_documents_to_val": plan.suite_documents, "suite_pairs_to_heldout": sft["suite_pairs"]}
    return stats


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
                       ("finetune.max_pairs", finetune.max_pairs), ("tokenizer.sample_bytes", tokenizer.sample_bytes)):
        if value < 0:
            problems.append(f"{key}={value}: must be >= 0 (0 means no limit)")
    for key, value, allowed in (("data.on_bad_utf8", data.on_bad_utf8, ("replace", "skip")),
                                ("data.on_bad_json", data.on_bad_json, ("fail", "skip"))):
        if value not in allowed:
            problems.append(f"{key}={value!r}: must be one of {', '.join(allowed)}")
    if problems:
        raise DataError("invalid data settings:\n  " + "\n  ".join(problems))

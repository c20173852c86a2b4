"""Data stage: corpus -> byte-level BPE tokenizer -> packed rows + SFT pairs on disk.

`prepare_data` is the stage; the other public functions are its steps, kept
public so tests and notebooks can run one step on its own.

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

import ast
import hashlib
import itertools
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from components.artifacts import TokenizedData
from components.files import atomic_write

EOT = "<|endoftext|>"
PAD_ID = 0  # padding reuses the EOT id; the SFT mask hides it from the loss

# Bump when the on-disk format or the processing changes, so old fingerprints
# stop matching.
_FORMAT_VERSION = 1

_STDLIB = "stdlib"
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "site-packages", "__pycache__", "idlelib", "lib2to3"})
_FOLDER_SUFFIXES = (".txt", ".md", ".py")
_TOKENIZER_FILE = "tokenizer.json"
_MANIFEST_FILE = "manifest.json"


class DataError(ValueError):
    """A problem with the user's data or data config; the message says where and what to do."""


@dataclass(frozen=True)
class Document:
    """One unit of the corpus.

    Attributes:
        doc_id: stable name: path relative to the source folder, or
            "file.jsonl:LINE" / "file.parquet:ROW".
        text: the document's text.
    """

    doc_id: str
    text: str


@dataclass(frozen=True)
class Pair:
    """One supervised example: the model sees `prompt` and learns `completion`."""

    prompt: str
    completion: str
    doc_id: str


# ---------------------------------------------------------------------------
# Reading documents
# ---------------------------------------------------------------------------


def iter_documents(source: str, *, text_field: str = "text", max_bytes: int = 0) -> Iterator[Document]:
    """Yield the documents of a corpus in a deterministic order.

    Args:
        source: "stdlib" (the .py files of this Python's standard library, tests
            excluded), a folder (its .txt/.md/.py files, recursively), a
            `.jsonl` file (one JSON object per line) or a `.parquet` file.
        text_field: key (jsonl) or column (parquet) holding the text.
        max_bytes: if > 0, keep a deterministic subset spread over the corpus:
            documents ordered by sha256("subset:" + doc_id), taken until their
            UTF-8 size reaches `max_bytes`. The subset is yielded in corpus order.

    Raises:
        DataError: missing path, unsupported file type, a jsonl line that is
            not an object with a string `text_field`, a parquet file without
            that column.
    """
    if source == _STDLIB:
        yield from _iter_tree(_stdlib_root(), (".py",), _STDLIB_SKIP_DIRS, max_bytes)
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"data.source={source!r} does not exist; give a folder, a .jsonl or .parquet file, or 'stdlib'")
    if path.is_dir():
        yield from _iter_tree(path, _FOLDER_SUFFIXES, frozenset(), max_bytes)
    elif path.suffix == ".jsonl":
        yield from _subset(_iter_jsonl_texts(path, text_field), max_bytes)
    elif path.suffix == ".parquet":
        yield from _subset(_iter_parquet_texts(path, text_field), max_bytes)
    else:
        raise DataError(
            f"data.source={source!r}: unsupported file type {path.suffix!r}; "
            "give a folder of .txt/.md/.py files, a .jsonl or .parquet file, or 'stdlib'"
        )


def document_split(doc_id: str, val_fraction: float) -> str:
    """Assign a document to "train" or "val" from a hash of its id.

    The split of a document never changes when other documents are added or
    removed, so validation stays comparable across corpus versions.

    Returns:
        "val" for about `val_fraction` of ids, "train" for the rest.
    """
    return "val" if _unit_hash(doc_id) < val_fraction else "train"


def _unit_hash(key: str) -> float:
    """Map a string to [0, 1) via sha256: stable across runs and machines (unlike hash())."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _subset_key(key: str) -> str:
    # Salted: ordering by the same hash as document_split would fill a small
    # subset with exactly the documents that go to val.
    return hashlib.sha256(b"subset:" + key.encode("utf-8")).hexdigest()


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_tree(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str]) -> list[tuple[str, Path]]:
    """(doc_id, path) of matching files under root, sorted by doc_id (POSIX relative path)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs]
        for name in filenames:
            if name.endswith(suffixes):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _read_text(path: Path) -> str:
    # Corpora collect stray bytes; a replaced character is better than losing the file.
    return path.read_text(encoding="utf-8", errors="replace")


def _iter_tree(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset[str], max_bytes: int) -> Iterator[Document]:
    listing = _list_tree(root, suffixes, skip_dirs)
    if max_bytes <= 0:
        for doc_id, path in listing:
            text = _read_text(path)
            if text:  # an empty file would only add a lone EOT
                yield Document(doc_id, text)
        return
    # Read in hash order so only the chosen files are read, then restore corpus order.
    chosen: list[Document] = []
    total = 0
    for doc_id, path in sorted(listing, key=lambda item: _subset_key(item[0])):
        if total >= max_bytes:
            break
        text = _read_text(path)
        if text:
            chosen.append(Document(doc_id, text))
            total += len(text.encode("utf-8"))
    order = {doc_id: i for i, (doc_id, _) in enumerate(listing)}
    yield from sorted(chosen, key=lambda d: order[d.doc_id])


def _subset(docs: Iterable[Document], max_bytes: int) -> Iterator[Document]:
    """Apply the `max_bytes` selection to an in-order document stream."""
    if max_bytes <= 0:
        yield from docs
        return
    docs = list(docs)
    chosen: set[int] = set()
    total = 0
    for i in sorted(range(len(docs)), key=lambda i: _subset_key(docs[i].doc_id)):
        if total >= max_bytes:
            break
        chosen.add(i)
        total += len(docs[i].text.encode("utf-8"))
    yield from (d for i, d in enumerate(docs) if i in chosen)


def _iter_jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(1-based line number, object) for each non-blank line of a jsonl file."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _iter_jsonl_texts(path: Path, text_field: str) -> Iterator[Document]:
    for lineno, obj in _iter_jsonl_objects(path):
        text = obj.get(text_field)
        if not isinstance(text, str):
            problem = "has no" if text_field not in obj else "has a non-string"
            raise DataError(
                f"{path}:{lineno}: object {problem} field {text_field!r} (keys: {sorted(obj)}); "
                "fix the line or set data.text_field to the key that holds the text"
            )
        if text:
            yield Document(f"{path.name}:{lineno}", text)


def _iter_parquet_texts(path: Path, text_field: str) -> Iterator[Document]:
    names = pq.read_schema(path).names
    if text_field not in names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {names}); set data.text_field to the text column")
    column = pq.read_table(path, columns=[text_field]).column(text_field)
    for row, text in enumerate(column.to_pylist(), start=1):
        if text is None or text == "":  # null rows are common in exported datasets
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}: row {row} of column {text_field!r} is {type(text).__name__}, expected a string")
        yield Document(f"{path.name}:{row}", text)


# ---------------------------------------------------------------------------
# Tokenizer and packing
# ---------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) on `texts`.

    Every byte is in the initial alphabet, so any text encodes without unknown
    tokens and decodes back exactly.

    Args:
        texts: training texts; the same texts give the same tokenizer.
        vocab_size: target vocabulary size including the 256 bytes and EOT.

    Returns:
        A tokenizer with `EOT` at id 0.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert tokenizer.token_to_id(EOT) == PAD_ID, "EOT must be id 0"
    return tokenizer


def pack_rows(docs_token_ids: Iterable[list[int]], block_size: int) -> np.ndarray:
    """Concatenate documents (each followed by EOT) and cut into training rows.

    Rows are block_size + 1 long so that inputs are row[:-1] and targets row[1:].

    Returns:
        int32 array (N, block_size + 1); the incomplete tail is dropped.
    """
    eot = np.array([PAD_ID], dtype=np.int32)
    pieces = []
    for ids in docs_token_ids:
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(eot)
    stream = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    row_len = block_size + 1
    n_rows = len(stream) // row_len
    return stream[: n_rows * row_len].reshape(n_rows, row_len)  # (N, block_size + 1)


# ---------------------------------------------------------------------------
# Supervised pairs
# ---------------------------------------------------------------------------


def extract_function_pairs(source: str, *, max_bytes: int = 0, max_pairs: int = 0) -> list[Pair]:
    """Build prompt/completion pairs, by default from documented Python functions.

    For each function (or method, sync or async) with a docstring and more
    body after it: prompt = source from the `def` line through the end of the
    docstring plus a newline (decorators left out); completion = the rest of
    the body with its original indentation.

    Args:
        source: "stdlib", a folder of .py files (files that fail to parse are
            skipped), or a .jsonl file of {"prompt": str, "completion": str}.
        max_bytes: as in `iter_documents`, applied to the .py files read.
        max_pairs: if > 0, keep a deterministic subset of this many pairs
            (chosen by sha256 of "subset:" + doc_id + prompt, kept in
            extraction order).

    Returns:
        Pairs in a deterministic order.

    Raises:
        DataError: missing path, unsupported file type, bad jsonl line.
    """
    path = Path(source)
    if source != _STDLIB and path.exists() and not path.is_dir():  # one file: pairs as they are
        if path.suffix != ".jsonl":
            raise DataError(
                f"finetune.source={source!r}: unsupported file type {path.suffix!r}; "
                "give a folder of .py files, a .jsonl file of prompt/completion objects, or 'stdlib'"
            )
        pairs = list(_iter_jsonl_pairs(path))
    else:  # the stdlib or a folder of .py files (a missing path fails in _sft_documents)
        pairs = [p for doc in _sft_documents(source, max_bytes) for p in _function_pairs(doc)]
    if max_pairs > 0 and len(pairs) > max_pairs:
        keep = set(sorted(range(len(pairs)), key=lambda i: _subset_key(pairs[i].doc_id + pairs[i].prompt))[:max_pairs])
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    return pairs


def _function_pairs(doc: Document) -> Iterator[Pair]:
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError):  # ValueError: null bytes in source
        return
    # ast line numbers count "\n" only; str.splitlines would also split on \f etc.
    lines = doc.text.split("\n")
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if ast.get_docstring(node, clean=False) is None or len(node.body) < 2:
            continue
        doc_end = node.body[0].end_lineno
        # One-line forms like `"""doc"""; return x` have no clean cut between prompt and body.
        if node.body[1].lineno <= doc_end:
            continue
        prompt = "\n".join(lines[node.lineno - 1 : doc_end]) + "\n"
        completion = "\n".join(lines[doc_end : node.end_lineno]) + "\n"
        if completion.strip():
            yield Pair(prompt=prompt, completion=completion, doc_id=doc.doc_id)


def _iter_jsonl_pairs(path: Path) -> Iterator[Pair]:
    for lineno, obj in _iter_jsonl_objects(path):
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(
                f"{path}:{lineno}: expected string fields 'prompt' and 'completion' (keys: {sorted(obj)}); fix the line"
            )
        yield Pair(prompt=prompt, completion=completion, doc_id=f"{path.name}:{lineno}")


def tokenize_pairs(pairs: Iterable[Pair], tokenizer: Tokenizer, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize pairs into fixed-length rows with a loss mask.

    A row is prompt ids + completion ids + EOT, truncated to block_size + 1
    (the EOT is lost if it does not fit) and right-padded with PAD_ID. Prompt
    and completion are encoded separately so the mask boundary falls on a
    token boundary, exactly as at generation time. Pairs whose prompt takes
    more than half the row are skipped: too little room left to learn from.

    Returns:
        tokens: int32 (N, block_size + 1).
        mask: int8 (N, block_size + 1); 1 on completion ids and the final EOT.
    """
    pairs = list(pairs)
    row_len = block_size + 1
    prompts = tokenizer.encode_batch([p.prompt for p in pairs], add_special_tokens=False)
    completions = tokenizer.encode_batch([p.completion for p in pairs], add_special_tokens=False)
    rows, masks = [], []
    for prompt, completion in zip(prompts, completions):
        p_ids = prompt.ids
        if len(p_ids) > row_len / 2:
            continue
        c_ids = completion.ids + [PAD_ID]  # EOT closes the completion
        ids = (p_ids + c_ids)[:row_len]
        mask = ([0] * len(p_ids) + [1] * len(c_ids))[:row_len]
        pad = row_len - len(ids)
        rows.append(ids + [PAD_ID] * pad)
        masks.append(mask + [0] * pad)
    tokens = np.array(rows, dtype=np.int32).reshape(-1, row_len)  # (N, block_size + 1)
    mask_arr = np.array(masks, dtype=np.int8).reshape(-1, row_len)  # (N, block_size + 1)
    return tokens, mask_arr


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------


def fingerprint(docs: Iterable[Document], **config) -> str:
    """sha256 hex over document ids and texts and the sorted config items.

    Equal fingerprints mean equal inputs, so a cached output can be reused.
    """
    h = hashlib.sha256()

    def feed(s: str) -> None:
        b = s.encode("utf-8")
        h.update(len(b).to_bytes(8, "big"))  # length prefix: ("ab","c") != ("a","bc")
        h.update(b)

    for doc in docs:
        feed(doc.doc_id)
        feed(doc.text)
    feed(json.dumps(sorted(config.items()), default=str))
    return h.hexdigest()


def source_fingerprint(source: str = "stdlib", *, text_field: str = "text", max_bytes: int = 0,
                       sft_source: str = "stdlib", sft_max_bytes: int = 0) -> str:
    """sha256 over the documents `prepare_data` would read (the corpus and the SFT source), without tokenizing.

    It changes when a file of a source folder is added, removed or edited (within the
    `max_bytes` subsets), so it keys the data stage's cache and the new-data trigger.
    Reading costs about as much as the sources' size on disk.

    Raises:
        DataError: a missing path or an unsupported file type, as `iter_documents` says.
    """
    docs = iter_documents(source, text_field=text_field, max_bytes=max_bytes)
    sft = (Document(f"sft:{d.doc_id}", d.text) for d in _sft_documents(sft_source, sft_max_bytes))
    # Streamed, one document at a time: the corpus is never all in memory.
    return fingerprint(itertools.chain(docs, sft), format_version=_FORMAT_VERSION, text_field=text_field)


def _sft_documents(source: str, max_bytes: int) -> Iterator[Document]:
    """The raw files `extract_function_pairs` reads, as documents."""
    if source == _STDLIB:
        yield from _iter_tree(_stdlib_root(), (".py",), _STDLIB_SKIP_DIRS, max_bytes)
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"finetune.source={source!r} does not exist; give a folder of .py files, a .jsonl file, "
                        f"or 'stdlib'")
    if path.is_dir():
        yield from _iter_tree(path, (".py",), frozenset(), max_bytes)
    else:
        yield Document(path.name, _read_text(path))


def prepare_data(
    out_dir: str,
    *,
    source: str = "stdlib",
    text_field: str = "text",
    max_bytes: int = 0,
    block_size: int = 128,
    val_fraction: float = 0.05,
    vocab_size: int = 4096,
    sft_source: str = "stdlib",
    sft_max_bytes: int = 0,
    sft_max_pairs: int = 0,
    sft_heldout_fraction: float = 0.1,
    progress: Callable[[str], None] | None = None,
) -> TokenizedData:
    """Turn a corpus into a tokenizer, packed pretraining rows and SFT rows.

    Args:
        out_dir: folder to write into (created if needed).
        source, text_field, max_bytes: the pretraining corpus, see `iter_documents`.
        block_size: model context length; rows are block_size + 1 tokens.
        val_fraction: share of documents held out for validation, by doc id.
        vocab_size: BPE vocabulary size (at least 257: 256 bytes + EOT).
        sft_source, sft_max_bytes, sft_max_pairs: the supervised pairs, see
            `extract_function_pairs`.
        sft_heldout_fraction: share of pairs held out for evaluation.
        progress: called with short human-readable status lines.

    Returns:
        TokenizedData with absolute paths, the fingerprint and the counts.

    Raises:
        DataError: invalid settings (all reported at once), an empty corpus,
            a corpus too small for block_size, or too few SFT pairs.
    """
    say = progress or (lambda msg: None)
    _validate(block_size=block_size, val_fraction=val_fraction, vocab_size=vocab_size, max_bytes=max_bytes,
              sft_max_bytes=sft_max_bytes, sft_max_pairs=sft_max_pairs, sft_heldout_fraction=sft_heldout_fraction)
    config = dict(source=source, text_field=text_field, max_bytes=max_bytes, block_size=block_size,
                  val_fraction=val_fraction, vocab_size=vocab_size, sft_source=sft_source,
                  sft_max_bytes=sft_max_bytes, sft_max_pairs=sft_max_pairs,
                  sft_heldout_fraction=sft_heldout_fraction)

    # Read and split the corpus.
    docs = list(iter_documents(source, text_field=text_field, max_bytes=max_bytes))
    if not docs:
        raise DataError(
            f"no documents found in data.source={source}: expected non-empty .txt/.md/.py files in a folder, "
            f"objects with a {text_field!r} string in a .jsonl file, or a {text_field!r} column in a .parquet file"
        )
    n_bytes = sum(len(d.text.encode("utf-8")) for d in docs)
    say(f"read {len(docs)} documents ({n_bytes / 1e6:.1f} MB) from {source}")
    train_docs, val_docs = _split_documents(docs, val_fraction)

    # Tokenizer from train only, so val measures generalisation of the whole pipeline.
    tokenizer = train_tokenizer((d.text for d in train_docs), vocab_size)
    say(f"trained tokenizer ({tokenizer.get_vocab_size()} tokens)")

    splits = {}
    for name, split_docs in (("train", train_docs), ("val", val_docs)):
        ids = [e.ids for e in tokenizer.encode_batch([d.text for d in split_docs], add_special_tokens=False)]
        rows = pack_rows(ids, block_size)
        splits[name] = (split_docs, sum(len(x) + 1 for x in ids), rows)  # +1: the EOT after each document
        say(f"{name}: {len(split_docs)} documents, {splits[name][1]} tokens, {len(rows)} rows")
    _check_rows(splits, block_size)

    # Supervised pairs, split per pair so both sides see every kind of file.
    pairs = extract_function_pairs(sft_source, max_bytes=sft_max_bytes, max_pairs=sft_max_pairs)
    sft_split = {"train": [], "val": []}
    for p in pairs:
        sft_split[document_split(p.doc_id + p.prompt, sft_heldout_fraction)].append(p)
    sft = {
        "sft_train": tokenize_pairs(sft_split["train"], tokenizer, block_size),
        "sft_heldout": tokenize_pairs(sft_split["val"], tokenizer, block_size),
    }
    _check_pairs(sft, len(pairs), sft_source)
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
    tokenizer_path = root / _TOKENIZER_FILE
    atomic_write(tokenizer_path, lambda tmp: tokenizer.save(str(tmp)))
    for name in ("train", "val"):
        table = pa.table({"tokens": _list_column(splits[name][2], pa.int32())})
        atomic_write(paths[name], lambda tmp, t=table: pq.write_table(t, tmp))
    for name, (tokens, mask) in sft.items():
        table = pa.table({"tokens": _list_column(tokens, pa.int32()), "mask": _list_column(mask, pa.int8())})
        atomic_write(paths[name], lambda tmp, t=table: pq.write_table(t, tmp))
    manifest = {
        "source": source,
        "sft_source": sft_source,
        "fingerprint": fp,
        "format_version": _FORMAT_VERSION,
        "vocab_size": tokenizer.get_vocab_size(),
        "block_size": block_size,
        "tokenizer": _TOKENIZER_FILE,
        "eot_token": EOT,
        "eot_id": PAD_ID,
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
        vocab_size=tokenizer.get_vocab_size(),
        block_size=block_size,
        stats=stats,
    )


def _validate(**settings) -> None:
    """Report every bad setting at once, by its experiment-config key (components/config.py)."""
    s = settings
    problems = []
    if s["block_size"] < 2:
        problems.append(f"data.block_size={s['block_size']}: must be at least 2")
    if not 0 < s["val_fraction"] < 1:
        problems.append(f"data.val_fraction={s['val_fraction']}: must be between 0 and 1 (exclusive)")
    if not 0 < s["sft_heldout_fraction"] < 1:
        problems.append(f"finetune.heldout_fraction={s['sft_heldout_fraction']}: must be between 0 and 1 (exclusive)")
    if s["vocab_size"] < 257:
        problems.append(f"tokenizer.vocab_size={s['vocab_size']}: must be at least 257 (256 bytes + {EOT})")
    for arg, key in (("max_bytes", "data.max_bytes"), ("sft_max_bytes", "finetune.max_bytes"),
                     ("sft_max_pairs", "finetune.max_pairs")):
        if s[arg] < 0:
            problems.append(f"{key}={s[arg]}: must be >= 0 (0 means no limit)")
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


def _list_column(rows: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """(N, L) array -> list<value_type> column without a Python loop per row."""
    n, length = rows.shape
    assert n * length < 2**31, "list<> offsets are int32; shard the split instead"
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * length, type=pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(rows.reshape(-1), type=value_type))

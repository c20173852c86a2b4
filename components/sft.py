"""Supervised fine-tuning pairs: prompt/completion pairs from documented Python functions or a
.jsonl file, tokenized into fixed-length rows with a loss mask."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer

from components import storage
from components.sources import STDLIB, DataError, Document, iter_jsonl_objects, iter_sft_documents, subset_key
from components.tokenizer import EOT_ID

PAD_ID = EOT_ID  # rows are right-padded with the EOT id; the mask keeps padding out of the loss


@dataclass(frozen=True)
class Pair:
    """One supervised example: the model sees `prompt` and learns `completion`."""

    prompt: str
    completion: str
    doc_id: str


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
    if source != STDLIB and _is_file(source):  # one file (a path or a storage URI): pairs as they are
        if path.suffix != ".jsonl":
            raise DataError(
                f"finetune.source={source!r}: unsupported file type {path.suffix!r}; "
                "give a folder of .py files, a .jsonl file of prompt/completion objects, or 'stdlib'"
            )
        pairs = list(_iter_jsonl_pairs(source))
    else:  # the stdlib or a folder of .py files (a missing path fails in iter_sft_documents)
        pairs = [p for doc in iter_sft_documents(source, max_bytes) for p in _function_pairs(doc)]
    if max_pairs > 0 and len(pairs) > max_pairs:
        keep = set(sorted(range(len(pairs)), key=lambda i: subset_key(pairs[i].doc_id + pairs[i].prompt))[:max_pairs])
        pairs = [p for i, p in enumerate(pairs) if i in keep]
    return pairs


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
        c_ids = completion.ids + [EOT_ID]  # EOT closes the completion
        ids = (p_ids + c_ids)[:row_len]
        mask = ([0] * len(p_ids) + [1] * len(c_ids))[:row_len]
        pad = row_len - len(ids)
        rows.append(ids + [PAD_ID] * pad)
        masks.append(mask + [0] * pad)
    tokens = np.array(rows, dtype=np.int32).reshape(-1, row_len)  # (N, block_size + 1)
    mask_arr = np.array(masks, dtype=np.int8).reshape(-1, row_len)  # (N, block_size + 1)
    return tokens, mask_arr


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


def _is_file(source: str) -> bool:
    try:
        return storage.is_file(source)
    except OSError:  # an unreachable location: iter_sft_documents names it
        return False


def _iter_jsonl_pairs(path: str) -> Iterator[Pair]:
    for lineno, obj in iter_jsonl_objects(path):
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(
                f"{path}:{lineno}: expected string fields 'prompt' and 'completion' (keys: {sorted(obj)}); fix the line"
            )
        yield Pair(prompt=prompt, completion=completion, doc_id=f"{Path(path).name}:{lineno}")

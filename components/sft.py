"""Supervised fine-tuning data, tokenized into fixed-length rows with a loss mask: prompt/completion
pairs from documented Python functions or a .jsonl file, or chat conversations (`messages` rows of a
.jsonl or .parquet file, or the same functions as a user's request and the assistant's answer)."""
from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from components import storage
from components.chat import CHAT_TOKENS, ChatError, check_messages, render_for_training
from components.sources import STDLIB, DataError, Document, iter_jsonl_objects, iter_sft_documents, subset_key
from components.tokenizer import EOT_ID, eot_id

PAD_ID = EOT_ID  # rows are right-padded with the EOT id; the mask keeps padding out of the loss


@dataclass(frozen=True)
class Pair:
    """One supervised example: the model sees `prompt` and learns `completion`."""

    prompt: str
    completion: str
    doc_id: str

    @property
    def split_key(self) -> str:
        """What decides the pair's side (train or heldout) and its place in a `max_pairs` subset."""
        return self.doc_id + self.prompt

    @property
    def text(self) -> str:
        """The pair as one text, for the data stage's fingerprint."""
        return self.prompt + "\0" + self.completion


@dataclass(frozen=True)
class Conversation:
    """One chat example: checked {role, content} messages; the model learns the assistant's turns."""

    messages: tuple[dict, ...]
    doc_id: str

    @property
    def split_key(self) -> str:
        """As `Pair.split_key`."""
        return self.doc_id + self.text

    @property
    def text(self) -> str:
        """The messages as JSON, for the data stage's fingerprint."""
        return json.dumps(self.messages, ensure_ascii=False, sort_keys=True)


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
    return _subset_of(pairs, max_pairs)


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
    eot = eot_id(tokenizer)
    for prompt, completion in zip(prompts, completions):
        p_ids = prompt.ids
        if len(p_ids) > row_len / 2:
            continue
        c_ids = completion.ids + [eot]  # EOT closes the completion
        ids = (p_ids + c_ids)[:row_len]
        mask = ([0] * len(p_ids) + [1] * len(c_ids))[:row_len]
        pad = row_len - len(ids)
        rows.append(ids + [eot] * pad)  # PAD_ID, or the starting model's own EOT id
        masks.append(mask + [0] * pad)
    tokens = np.array(rows, dtype=np.int32).reshape(-1, row_len)  # (N, block_size + 1)
    mask_arr = np.array(masks, dtype=np.int8).reshape(-1, row_len)  # (N, block_size + 1)
    return tokens, mask_arr


CHAT_REQUEST = "Write the Python function with this signature and docstring.\n\n"
"""The user's words before a function's signature and docstring in the conversations built from .py files."""


def extract_conversations(source: str, *, max_bytes: int = 0, max_pairs: int = 0) -> list[Conversation]:
    """Chat examples (`finetune.format: chat`).

    Args:
        source: a .jsonl file of {"messages": [{"role": ..., "content": ...}, ...]} objects, a
            .parquet file with a `messages` column of such lists, or "stdlib" / a folder of .py
            files, whose function pairs (`extract_function_pairs`) become a user message
            (CHAT_REQUEST + signature and docstring) and the assistant's answer (the body).
        max_bytes, max_pairs: as in `extract_function_pairs` (max_pairs counts conversations).

    Returns:
        Conversations in a deterministic order.

    Raises:
        DataError: as `extract_function_pairs`, or a row that is not a conversation with an
            assistant turn, named by file:line (parquet: file:row N) and field, e.g.
            `chat.jsonl:3: messages[1].role='bot': must be one of system, user, assistant`.
    """
    if source != STDLIB and _is_file(source):
        suffix = Path(source).suffix
        if suffix == ".jsonl":
            rows = ((f"{source}:{n}", obj) for n, obj in iter_jsonl_objects(source))
        elif suffix == ".parquet":
            rows = _parquet_rows(source)
        else:
            raise DataError(f"finetune.source={source!r}: unsupported file type {suffix!r} for finetune.format=chat; "
                            "give a .jsonl or .parquet file of `messages` rows, a folder of .py files, or 'stdlib'")
        convs = [_conversation(where, row) for where, row in rows]
    else:
        convs = [Conversation(({"role": "user", "content": CHAT_REQUEST + p.prompt},
                               {"role": "assistant", "content": p.completion}), p.doc_id)
                 for p in extract_function_pairs(source, max_bytes=max_bytes)]
    return _subset_of(convs, max_pairs)


def add_chat_tokens(tokenizer: Tokenizer) -> tuple[int, ...]:
    """Add CHAT_TOKENS to `tokenizer` as special tokens (in place) and return their ids.

    A tokenizer of V tokens gets them as ids V, V+1, after the trained vocabulary, so every
    id the corpus was tokenized with keeps its meaning; one that holds them already keeps its ids.
    """
    tokenizer.add_special_tokens(list(CHAT_TOKENS))
    return tuple(tokenizer.token_to_id(token) for token in CHAT_TOKENS)


def tokenize_conversations(convs: Iterable[Conversation], tokenizer: Tokenizer, block_size: int,
                           template: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Tokenize conversations into fixed-length rows whose mask is 1 on the assistant's turns only.

    Each conversation is rendered with `template` as segments (`chat.render_for_training`),
    each encoded on its own so the mask boundaries fall on token boundaries. A row longer
    than block_size + 1 keeps its start and is cut there (truncated); one with no assistant
    token left inside the row is dropped. Rows are right-padded with the tokenizer's EOT id, as
    `tokenize_pairs` pads them.

    Returns:
        tokens: int32 (N, block_size + 1).
        mask: int8 (N, block_size + 1).
        counts: {"truncated": rows cut at the block, "dropped": conversations left out}.

    Raises:
        DataError: the template cannot mark this conversation's assistant turns.
    """
    missing = [t for t in CHAT_TOKENS if t in template and tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the tokenizer has no {missing}; call add_chat_tokens first")
    row_len, eot = block_size + 1, eot_id(tokenizer)
    rows, masks, counts = [], [], {"truncated": 0, "dropped": 0}
    for conv in convs:
        try:
            segments = render_for_training(list(conv.messages), template)
        except ChatError as error:
            raise DataError(f"{conv.doc_id}: {error}") from None
        ids, mask = [], []
        for enc, (_, target) in zip(tokenizer.encode_batch([t for t, _ in segments], add_special_tokens=False),
                                    segments):
            ids += enc.ids
            mask += [int(target)] * len(enc.ids)
        if 1 not in mask[:row_len]:
            counts["dropped"] += 1
            continue
        counts["truncated"] += len(ids) > row_len
        pad = max(0, row_len - len(ids))
        rows.append(ids[:row_len] + [eot] * pad)  # PAD_ID, or the starting model's own EOT id
        masks.append(mask[:row_len] + [0] * pad)
    tokens = np.array(rows, dtype=np.int32).reshape(-1, row_len)  # (N, block_size + 1)
    mask_arr = np.array(masks, dtype=np.int8).reshape(-1, row_len)  # (N, block_size + 1)
    return tokens, mask_arr, counts


def grow_vocab(model, vocab_size: int):
    """Give a GPT's (tied) token embedding `vocab_size` rows, in place, for tokens added to its tokenizer.

    The new rows start as the mean of the existing ones: their logits are then the mean logit, so
    the grown model predicts what it did before, up to a small share for the new tokens. A model
    that has the rows already is returned as it is.

    Returns:
        The model, its `config.vocab_size` updated.
    """
    import dataclasses

    import torch

    wte = model.transformer.wte.weight  # (V, n_embd)
    if vocab_size <= wte.shape[0]:
        return model
    with torch.no_grad():
        grown = torch.cat([wte, wte.mean(dim=0, keepdim=True).expand(vocab_size - wte.shape[0], -1)])
    model.lm_head.weight = model.transformer.wte.weight = torch.nn.Parameter(grown)  # still one tied Parameter
    model.transformer.wte.num_embeddings = model.lm_head.out_features = vocab_size
    model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    return model


def _conversation(where: str, row: dict) -> Conversation:
    if "messages" not in row:
        raise DataError(f"{where}: no 'messages' field (fields: {sorted(row)}); each row needs "
                        "messages: [{role, content}, ...]")
    try:
        messages = check_messages(row["messages"], where)
    except ChatError as error:
        raise DataError(str(error)) from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: messages has no assistant turn, so nothing to learn from; add one or drop the row")
    return Conversation(tuple(messages), where.rsplit("/", 1)[-1])


def _parquet_rows(path: str) -> Iterator[tuple[str, dict]]:
    fs, local = storage.resolve(path)
    try:
        table = pq.read_table(local, filesystem=fs)
    except Exception as error:  # noqa: BLE001 - pyarrow raises several kinds for a file it cannot read
        raise DataError(f"finetune.source={path!r}: not a readable parquet file ({error})") from None
    if "messages" not in table.column_names:
        raise DataError(f"{path}: no 'messages' column (columns: {table.column_names}); give each row a "
                        "messages list of {role, content}")
    for i, messages in enumerate(table["messages"].to_pylist(), start=1):
        yield f"{path}:row {i}", {"messages": messages}


def _subset_of(examples: list, max_pairs: int) -> list:
    """A deterministic subset of `max_pairs` examples (by sha256 of "subset:" + split_key), in their order."""
    if max_pairs <= 0 or len(examples) <= max_pairs:
        return examples
    keep = set(sorted(range(len(examples)), key=lambda i: subset_key(examples[i].split_key))[:max_pairs])
    return [e for i, e in enumerate(examples) if i in keep]


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

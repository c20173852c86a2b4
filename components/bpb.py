"""Bits per byte: a quality number that does not depend on the tokenizer.

Perplexity is per token, so two models with different vocabularies (or one model on
rows made by another tokenizer) cannot be compared by it. Bits per byte can: each model
reads the same raw text with its own tokenizer, and the summed loss is divided by the
text's UTF-8 size, which no tokenizer changes.

    bpb = (nats summed over the scored target tokens) / (ln 2 * UTF-8 bytes of the scored text)

The rule (`bits_per_byte`): every document is scored on its own, as `EOT + tokens`, the
way pretraining sees a document start; its tokens after the leading EOT are the targets,
each exactly once, in consecutive windows of `block_size` targets (a window's first target
sees only the tokens of that window before it: the context restarts every `block_size`
tokens, never across documents). EOT targets (id 0 in gptforge's tokenizers, 50256 in
GPT-2's) carry no bytes and are not scored. A document may be a (context, text) pair: then only `text` is scored, after
`context` (a held-out prompt and its completion).

`bpb_metrics` is what every candidate and the re-evaluated champion log, from the same
held-out data and settings, so the promotion compares numbers measured side by side.
"""
from __future__ import annotations

import json
import math
from typing import Iterable

import numpy as np
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer
from torch import nn

from components import storage
from components.artifacts import TokenizedData
from components.config import EvaluateConfig
from components.model import IGNORE_INDEX
from components.tokenizer import eot_id

BPB_METRICS = ("eval/val_bpb", "eval/completion_bpb")


@torch.no_grad()
def bits_per_byte(model: nn.Module, tokenizer: Tokenizer, texts: Iterable[str | tuple[str, str]], block_size: int,
                  batch_size: int, device: str | torch.device) -> float:
    """Bits per UTF-8 byte of `texts` under `model`, each text tokenized with `tokenizer` (the rule above).

    Args:
        model: called as `model(idx)` -> (logits (B, T, V), anything); in eval mode.
        texts: documents, or (context, text) pairs of which only `text` is scored.
        block_size: the model's context length: targets per window.
        batch_size: windows per forward pass.
        device: where the inputs go (the model's device).

    Raises:
        ValueError: the texts have no bytes to score, or a text the tokenizer does not give back exactly
            (its bytes would be counted without their loss).
    """
    windows, n_bytes, eot = [], 0, eot_id(tokenizer)
    for item in texts:
        context, text = ("", item) if isinstance(item, str) else item
        ids, scored_from = _encode(tokenizer, context, text, eot)
        n_bytes += len(text.encode("utf-8"))
        for start in range(0, len(ids) - 1, block_size):
            window = ids[start : start + block_size + 1]
            targets = [t if start + i + 1 >= scored_from and t != eot else IGNORE_INDEX
                       for i, t in enumerate(window[1:])]
            windows.append((window[:-1], targets))
    if n_bytes == 0:
        raise ValueError("no text to measure bits per byte on: the held-out texts are empty")
    nats = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        width = max(len(x) for x, _ in batch)
        x = torch.tensor([xs + [eot] * (width - len(xs)) for xs, _ in batch], dtype=torch.long, device=device)
        y = torch.tensor([ys + [IGNORE_INDEX] * (width - len(ys)) for _, ys in batch], dtype=torch.long, device=device)
        logits, _ = model(x)  # (B, T, V)
        losses = nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="none")
        nats += float(losses.double().sum())  # summed in float64: a long text adds up many small terms
    return nats / (math.log(2) * n_bytes)


def _encode(tokenizer: Tokenizer, context: str, text: str, eot: int) -> tuple[list[int], int]:
    """EOT + context ids + text ids, and where the text's ids start (context and text encoded apart,
    so the boundary falls on a token boundary)."""
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids if context else []
    text_ids = tokenizer.encode(text, add_special_tokens=False).ids
    if tokenizer.decode(text_ids, skip_special_tokens=False) != text:
        raise ValueError(f"the tokenizer does not give back the text it encoded ({text[:40]!r}...), so its bytes "
                         "cannot be scored; bits per byte needs a lossless (byte-level) tokenizer")
    return [eot, *context_ids, *text_ids], 1 + len(context_ids)


# ------------------------------------------------------------------ the held-out data


def bpb_metrics(model: nn.Module, tokenizer: Tokenizer, data: TokenizedData, cfg: EvaluateConfig) -> dict[str, float]:
    """`eval/val_bpb` (held-out documents) and `eval/completion_bpb` (held-out completions after their
    prompts) of `model` read with its own `tokenizer`, on the held-out data of `data`.

    The same call measures every candidate and the champion re-evaluated beside them.
    """
    device = model.transformer.wpe.weight.device  # never quantized, so always a plain tensor
    block = model.config.block_size
    data_tokenizer = Tokenizer.from_str(storage.read_text(data.tokenizer_uri))
    texts = heldout_texts(data, data_tokenizer, cfg.bpb_max_bytes)
    pairs = heldout_pairs(data, data_tokenizer)
    return {"eval/val_bpb": bits_per_byte(model, tokenizer, texts, block, cfg.batch_size, device),
            "eval/completion_bpb": bits_per_byte(model, tokenizer, pairs, block, cfg.batch_size, device)}


def suite_bpb_metrics(model: nn.Module, tokenizer: Tokenizer, suite_view: TokenizedData,
                      cfg: EvaluateConfig) -> dict[str, float]:
    """`bpb_metrics` on the evaluation suite (`components.suite.Suite.view`), as `eval/suite_bpb` and
    `eval/suite_completion_bpb`: the numbers that compare across runs whatever their data."""
    measured = bpb_metrics(model, tokenizer, suite_view, cfg)
    return {"eval/suite_bpb": measured["eval/val_bpb"], "eval/suite_completion_bpb": measured["eval/completion_bpb"]}


def heldout_texts(data: TokenizedData, data_tokenizer: Tokenizer, max_bytes: int) -> list[str]:
    """The held-out documents as text, in order, until `max_bytes` UTF-8 bytes (0: all); the document
    that crosses the limit is cut there (on a character boundary).

    From the data stage's `heldout_text_uri` (JSON lines, {"text": ...}); a record written before the
    data stage wrote that file gets its validation rows decoded instead (documents split at EOT).
    """
    if data.heldout_text_uri:
        lines = storage.read_text(data.heldout_text_uri).splitlines()
        texts = [json.loads(line)["text"] for line in lines if line.strip()]
    else:
        fs, path = storage.resolve(data.val_uri)
        rows = pq.read_table(path, columns=["tokens"], filesystem=fs).column("tokens").to_pylist()
        stream = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
        eot = eot_id(data_tokenizer)
        pieces = np.split(stream, np.flatnonzero(stream == eot))
        texts = [data_tokenizer.decode(p[p != eot].tolist()) for p in pieces]
    return _first_bytes([t for t in texts if t], max_bytes)


def heldout_pairs(data: TokenizedData, data_tokenizer: Tokenizer) -> list[tuple[str, str]]:
    """The held-out (prompt, completion) pairs as text, decoded from the data stage's `sft_heldout` rows."""
    fs, path = storage.resolve(data.sft_heldout_uri)
    table = pq.read_table(path, columns=["tokens", "mask"], filesystem=fs)
    pairs, eot = [], eot_id(data_tokenizer)
    for tokens, mask in zip(table.column("tokens").to_pylist(), table.column("mask").to_pylist()):
        completion = [t for t, m in zip(tokens, mask) if m and t != eot]
        if completion:
            pairs.append((data_tokenizer.decode(tokens[: mask.index(1)]), data_tokenizer.decode(completion)))
    return pairs


def _first_bytes(texts: list[str], max_bytes: int) -> list[str]:
    if max_bytes <= 0:
        return texts
    out, left = [], max_bytes
    for text in texts:
        if left <= 0:
            break
        raw = text.encode("utf-8")
        out.append(text if len(raw) <= left else raw[:left].decode("utf-8", errors="ignore"))
        left -= len(raw)
    return out

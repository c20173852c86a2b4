"""One completion of the endpoint, row by row: what it asks for, and what it has generated and sent.

Pure PyTorch + tokenizers (no Ray, no HTTP). Both engines, the static batches of
components/generation.py `generate_batch` and the iteration-level batches of
components/continuous.py, drive the same `_RowState`s: each samples a row with its own
settings (temperature, top_k, top_p, its request's seeded generator), records the token,
and reports `Delta`s through the row's `emit` as soon as text is safe to send: text that
could still turn out to be the start of a stop sequence, or half of a UTF-8 character, is held back.

Token healing: a prompt that ends on a token boundary the training data rarely had
(`"def add(a, b):\\n"` ends in a lone "\\n" token, while the corpus tokenizes
"\\n    return" as "\\n   " + " return", and a lone "\\n" is what comes before
end-of-text) makes a small model predict end-of-text at once. So the last prompt
token is taken back and the first new token must start with its text; the
completion is what comes after that text. Greedy decoding of the README's example
then continues the function instead of stopping.

One request cannot fail another's: what raises while one row is set up, echoed or sampled
fails that row's request alone (`_fail`, through its `Row.fail`).
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from components.detokenize import IncrementalDecoder

@dataclass(frozen=True)
class Sampling:
    """How one completion is sampled and what it reports (the OpenAI completions fields)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: sample among the smallest set of tokens holding this probability
    top_k: int | None = None
    stop: tuple[str, ...] = ()  # the completion ends before the first of these strings
    logprobs: int | None = None  # None: no log-probabilities; k: the chosen token's and the k most likely
    echo: bool = False  # the prompt is part of the returned text (and of the logprobs)
    heal: bool = True  # token healing (below); off for token-level generation, which continues the ids as given


@dataclass
class LogprobEntry:
    """One token of the returned text with its log-probability under the model (temperature 1)."""

    text: str
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: dict[str, float] | None
    offset: int  # character offset in the returned text (echoed prompt included)


@dataclass
class Delta:
    """New text for one row; `finish_reason` ("stop" or "length") on the row's last delta."""

    text: str
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0  # set on the last delta


@dataclass
class Row:
    """One completion to generate. `generator` samples it (shared by a request's rows, seeded).

    `fail` hears why the row could not be completed; a request's rows share one (equal) `fail`
    and stop together. Without one, `generate_batch` raises instead."""

    prompt_ids: list[int]
    prompt_text: str
    sampling: Sampling
    emit: Callable[[Delta], None]
    generator: torch.Generator | None = None
    fail: Callable[[BaseException], None] | None = None
    cancelled: bool = False  # set by the request's side (a client that went away): the row stops at the next step


class TokenText:
    """Per-token strings of a byte-level BPE tokenizer, for healing and logprobs."""

    def __init__(self, tokenizer, vocab_rows: int):
        self.tokenizer = tokenizer
        size = tokenizer.get_vocab_size()
        special = set(tokenizer.get_added_tokens_decoder())  # end-of-text: never a healing candidate
        # The raw token strings are in ByteLevel's alphabet, one character per byte, so a
        # prefix of a raw string is a prefix of its bytes.
        self.raw = [("" if i in special else tokenizer.id_to_token(i) or "") for i in range(size)]
        self.raw += [""] * max(0, vocab_rows - size)
        self._allowed: dict[str, torch.Tensor] = {}

    def starting_with(self, token_id: int) -> torch.Tensor:
        """(V,) bool: the tokens whose bytes start with those of `token_id` (itself included)."""
        prefix = self.raw[token_id]
        if prefix not in self._allowed:
            self._allowed[prefix] = torch.tensor([bool(r) and r.startswith(prefix) for r in self.raw])
        return self._allowed[prefix]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if ids else ""


class _RowState:
    """What one row has generated and sent so far.

    Text: the completion is decode(generated) less the healed prefix; the returned
    text is the prompt (with echo) followed by the completion. Log-probability
    entries cover the returned text token by token, with offsets into it.
    """

    def __init__(self, row: Row, text: TokenText, eos_id: int):
        self.row, self.text, self.eos_id = row, text, eos_id
        ids = row.prompt_ids
        # Heal: take the last prompt token back (when something is left before it, it is not end-of-text,
        # and its text is whole characters: half of one would not be a prefix of the decoded text).
        last = ids[-1] if row.sampling.heal and len(ids) >= 2 and text.raw[ids[-1]] else None
        self.healed = last if last is not None and "\ufffd" not in text.decode([last]) else None
        self.context = ids[:-1] if self.healed is not None else list(ids)
        self.prefix = text.decode([self.healed]) if self.healed is not None else ""
        self.echoed = row.prompt_text if row.sampling.echo else ""  # sent before the completion
        self.generated: list[int] = []
        # A first token that only gives the healed token back does not count against max_tokens.
        self.free_tokens = 0
        self.entries: list[LogprobEntry] = []
        self.sent_chars = 0  # of the completion
        self.sent_entries = 0
        self.finished = False
        self._decoded = ""  # decode(generated)
        self._decoder = IncrementalDecoder(text.decode)  # keeps it at a cost that does not grow with the row

    def completion(self) -> str:
        return self._decoded[len(self.prefix):]

    def add(self, token: int, logprobs: torch.Tensor | None) -> None:
        """Record a sampled token (and its (V,) log-probabilities), then send what is safe to send."""
        s = self.row.sampling
        if token == self.eos_id:
            self._finish(self.completion(), "stop")
            return
        before = len(self._decoded)
        if not self.generated and token == self.healed:
            self.free_tokens = 1
        self.generated.append(token)
        with_prefix = self._decoded = self._decoder.append(token)
        if logprobs is not None:
            if self.echoed:  # the healed prefix is echoed as the end of the prompt: this entry covers it
                text, offset = with_prefix[before:], len(self.echoed) - len(self.prefix) + before
            else:
                start = max(before, len(self.prefix))
                text, offset = with_prefix[start:], start - len(self.prefix)
            self.entries.append(_entry(text, token, logprobs, s.logprobs, self.text, offset))
        full = with_prefix[len(self.prefix):]
        cut = min((i for i in (full.find(stop) for stop in s.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._finish(full[:cut], "stop")
        elif len(self.generated) - self.free_tokens >= s.max_tokens:
            self._finish(full, "length")
        else:
            self._send(full[: _safe_length(full, s.stop)])

    def send_prompt(self, entries: list[LogprobEntry]) -> None:
        if self.echoed:
            self.row.emit(Delta(self.echoed, entries))

    def _send(self, upto: str, finish_reason: str | None = None) -> None:
        end = len(self.echoed) + len(upto)
        entries = list(itertools.takewhile(lambda e: e.offset < end or not e.text, self.entries[self.sent_entries:]))
        if len(upto) > self.sent_chars or entries or finish_reason:
            delta = Delta(upto[self.sent_chars:], entries, finish_reason,
                          len(self.generated) - self.free_tokens if finish_reason else 0)
            self.sent_chars = max(self.sent_chars, len(upto))
            self.sent_entries += len(entries)
            self.row.emit(delta)

    def _finish(self, text: str, reason: str) -> None:
        self.finished = True
        self._send(text, reason)


def sample_next(st: _RowState, logits: torch.Tensor, vocab: TokenText, first: bool, argmax: int | None = None) -> int:
    """Sample `st`'s next token from its (V,) float32 logits, record it (and send what is safe); returns it.

    `first`: the row's first new token, which a healed row must start with the healed token's text.
    `argmax`: the logits' argmax when the caller computed it for many rows at once (greedy rows take it
    instead of a per-row argmax, and a batch then needs one device sync, not one per row).
    """
    row_logits = logits
    constrained = first and st.healed is not None
    if constrained:
        row_logits = row_logits.masked_fill(~vocab.starting_with(st.healed), -math.inf)
    if argmax is not None and not constrained and st.row.sampling.temperature == 0:
        token = argmax
    else:
        token = _sample(row_logits, st.row.sampling, st.row.generator)
    st.add(token, F.log_softmax(logits, dim=-1) if st.row.sampling.logprobs is not None else None)
    return token


def _entry(text: str, token: int, logprobs: torch.Tensor, k: int, vocab: TokenText, offset: int) -> LogprobEntry:
    top = None
    if k:
        values, ids = torch.topk(logprobs, k)
        top = {vocab.decode([i]): float(v) for v, i in zip(values.tolist(), ids.tolist())}
    return LogprobEntry(text, float(logprobs[token]), top, offset)


def _safe_length(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: not a tail that may begin a stop string, nor a half character."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":  # an incomplete UTF-8 sequence decodes to U+FFFD
        end -= 1
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[end - n : end] == stop[:n]:
                hold = max(hold, n)
                break
    return end - hold


def _sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """One token id from (V,) float32 logits under the row's settings."""
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k is not None:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = F.softmax(logits, dim=-1)  # (V,)
    if s.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep a token when the mass before it is below top_p
        drop = sorted_probs.cumsum(0) - sorted_probs >= s.top_p
        drop[0] = False  # the most likely token always stays: a top_p that is 0 in float32 must not empty the set
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))

def _each_live_row(states: list[_RowState], action: Callable[[int, _RowState], None]) -> None:
    """`action(b, state)` for every unfinished row; one that raises fails its own request, not the loop."""
    for b, st in enumerate(states):
        if st.row.cancelled:  # nobody reads this row any more: it stops without another word
            st.finished = True
        if not st.finished:
            try:
                action(b, st)
            except Exception as error:  # noqa: BLE001 - the row's request fails alone
                _fail(states, st.row, error)


def _fail(states: list[_RowState], row: Row, error: Exception) -> None:
    """`row` cannot be completed: every row of its request stops and its `fail` hears why (none: raise)."""
    if row.fail is None:
        raise error
    logging.getLogger(__name__).error("a completion failed; the others of its batch go on", exc_info=error)
    for st in states:
        if st.row.fail == row.fail:
            st.finished = True
    try:
        row.fail(error)
    except Exception:  # noqa: BLE001 - one request's listener must not stop the batch
        logging.getLogger(__name__).exception("could not report a failed completion")


def _by_request(states: list[_RowState]) -> list[list[Row]]:
    """The rows grouped by request (equal `fail` callbacks), in order."""
    requests: list[list[Row]] = []
    for st in states:
        same = [rows for rows in requests if rows[0].fail == st.row.fail]
        if same:
            same[0].append(st.row)
        else:
            requests.append([st.row])
    return requests


def _send_prompt(st: _RowState, logits: torch.Tensor | None, vocab: TokenText) -> None:
    """Echo: the row's prompt goes out first, with its tokens' log-probabilities when asked.

    `logits` (P, V): the row's prefill logits past its padding; row p predicts token p+1
    (None when the row asks for no prompt log-probabilities).
    """
    s = st.row.sampling
    entries = []
    if s.echo and s.logprobs is not None:
        # The healed context; the healed token's text comes with the first new token's entry.
        row_lp = F.log_softmax(logits.float(), dim=-1)  # (P, V)
        offset = 0
        for p, token in enumerate(st.context):
            text = vocab.decode([token])
            entries.append(_entry(text, token, row_lp[p - 1], s.logprobs, vocab, offset) if p
                           else LogprobEntry(text, None, None, 0))
            offset += len(text)
    st.send_prompt(entries)

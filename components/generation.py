"""Text generation: `generate` and `complete` on the endpoint's continuous engine, `generate_batch` for static batches.

Pure PyTorch + tokenizers (no Ray, no HTTP), so it is tested in one process.

`generate` extends a batch of equal-length prompts with one set of sampling settings (temperature,
top_k) and returns the token ids; `complete` returns the text the endpoint gives for one prompt. Both
run on the continuous engine (components/continuous.py) and its per-row sampler
(components/rows.py), the engine the endpoint serves with, so what evaluation measures and samples is
what the endpoint does.

For the endpoint's static engine (`serve.batching: static`), `generate_batch` left-pads the rows'
prompts (components/rows.py `Row`) into one (B, L) batch, runs one prefill and then one decode step
per token for the whole batch until its longest completion ends. Each row is sampled, healed and
streamed by its own `_RowState` (components/rows.py), which the continuous engine shares.
A batched prefill that raises is run again one request at a time (nothing has been sent yet then).
"""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Callable

import torch

# The per-row pieces (sampling, stops, streamed deltas) are shared with the continuous engine.
from components.rows import (Delta, Row, Sampling, TokenText, _by_request, _each_live_row, _fail, _RowState, _sample,
                             _send_prompt, sample_next)

if TYPE_CHECKING:
    from components.model import GPT


class _NoText:
    """What the engine needs of a TokenText, for token-level generation: no text, so no healing and no stops."""

    def __init__(self, vocab_rows: int):
        self.raw = [""] * vocab_rows

    def decode(self, ids: list[int]) -> str:
        return ""


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    text: TokenText | None = None,
) -> torch.Tensor:
    """Extend each row of `idx` (B, T) by up to `max_new_tokens` tokens sampled from `model`.

    With `use_cache`, the rows run on the endpoint's continuous engine: the prompts in one forward
    (prefill), then one token per row and step on its KV cache, sampled row by row as the endpoint
    samples (no token healing: the ids are continued as given). Past `block_size` tokens the context is
    cropped to the last `block_size`; every position then shifts, so each further token comes from a
    fresh prefill of the cropped context, exactly as without the cache. Both paths give the same tokens.

    Args:
        temperature: softmax temperature; 0 means greedy (argmax).
        top_k: sample only among the k most likely tokens.
        eos_id: once a row has produced it, that row is padded with eos_id; generation
            stops early when every row has.
        generator: torch.Generator for reproducible sampling (the rows draw from it in turn).
        use_cache: decode incrementally (False recomputes the whole context at every step; kept
            as the reference the engine is tested against).
        on_token: called with each new (B, 1) token tensor as soon as it is chosen
            (evaluation times the steps with it; streaming can send it).
        text: the tokenizer's TokenText, so that each token is also decoded as the endpoint does
            (evaluation times that too); without it no text is made.

    Returns:
        (B, T + n) long tensor, n <= max_new_tokens. Call `model.eval()` first for dropout.
    """
    sampling = Sampling(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, heal=False)
    out, done = idx.tolist(), [False] * idx.size(0)
    step = _engine_steps if use_cache else _reference_steps
    made = 0
    while made < max_new_tokens and not all(done):
        block = model.config.block_size
        n = min(max_new_tokens - made, block - min(len(out[0]), block) + 1)  # the last token needs no room
        for tokens in step(model, [row[-block:] for row in out], replace(sampling, max_tokens=n), eos_id,
                           generator, text, done):
            for row, token in zip(out, tokens):
                row.append(token)
            made += 1
            if on_token is not None:
                on_token(torch.tensor(tokens, dtype=torch.long, device=idx.device)[:, None])
    return torch.tensor(out, dtype=torch.long, device=idx.device)


def _engine_steps(model, contexts, sampling, eos_id, generator, text, done):
    """Yield each step's tokens (eos for rows already done) while the engine extends `contexts`."""
    from components.continuous import ContinuousEngine

    eos = -1 if eos_id is None else eos_id  # no id is -1: no row ever stops early
    engine = ContinuousEngine(model, text or _NoText(model.config.vocab_size), eos, slots=len(contexts),
                              max_step_tokens=sum(len(c) for c in contexts))  # every prompt in the first step
    rows = {}
    for b, context in enumerate(contexts):
        if not done[b]:
            rows[b] = Row(context, "", sampling, lambda delta: None, generator)
    index = {id(row): b for b, row in rows.items()}
    sampled: dict[int, int] = {}
    engine.on_token = lambda row, token: sampled.__setitem__(index[id(row)], token)
    joining = list(rows.values())
    while joining or engine.running():
        engine.step(joining)
        joining = []
        if sampled:
            yield _step_tokens(sampled, done, eos_id)
            sampled.clear()


def _reference_steps(model, contexts, sampling, eos_id, generator, text, done):
    """What `_engine_steps` yields, without a cache: the whole context again at every step."""
    idx = torch.tensor(contexts, dtype=torch.long, device=model.transformer.wpe.weight.device)
    for _ in range(sampling.max_tokens):
        logits = model(idx[:, -model.config.block_size:])[0][:, -1, :].float()  # (B, V)
        sampled = {b: _sample(logits[b], sampling, generator) for b in range(len(contexts)) if not done[b]}
        tokens = _step_tokens(sampled, done, eos_id)
        yield tokens
        if all(done):
            return
        idx = torch.cat((idx, torch.tensor(tokens, dtype=torch.long, device=idx.device)[:, None]), dim=1)


def _step_tokens(sampled: dict[int, int], done: list[bool], eos_id: int | None) -> list[int]:
    tokens = [sampled.get(b, eos_id) for b in range(len(done))]
    for b, token in enumerate(tokens):
        done[b] = done[b] or token == eos_id
    return tokens


@torch.no_grad()
def complete(model, text: TokenText, prompt_ids: list[int], sampling: Sampling, eos_id: int,
             generator: torch.Generator | None = None) -> str:
    """The completion the endpoint's engine gives for one prompt (healing and stops as served).

    A prompt too long for the context with `sampling.max_tokens` keeps its last tokens."""
    from components.continuous import ContinuousEngine

    block = model.config.block_size
    sampling = replace(sampling, max_tokens=min(sampling.max_tokens, block - 1))
    ids = list(prompt_ids)[-(block - sampling.max_tokens):] or [eos_id]
    deltas: list[Delta] = []
    engine = ContinuousEngine(model, text, eos_id, slots=1, max_step_tokens=block)
    engine.step([Row(ids, text.decode(ids), sampling, deltas.append, generator)])
    while engine.running():
        engine.step()
    return "".join(d.text for d in deltas)

def batch_fits(rows: list[Row], block_size: int) -> bool:
    """Left padding makes every row as long as the longest prompt; the longest completion must still fit.

    (A healed row runs one token shorter and may generate one more: the same total.)
    """
    longest_prompt = max(len(r.prompt_ids) for r in rows)
    return longest_prompt + max(r.sampling.max_tokens for r in rows) <= block_size

@torch.no_grad()
def generate_batch(model, tokenizer_text: TokenText, rows: list[Row], eos_id: int) -> None:
    """Generate every row's completion together; each row's `emit` gets its deltas, the last with a finish_reason.

    The rows must fit together (`batch_fits`). One prefill over the left-padded prompts,
    then one batched decode step per token until every row has finished. A row's own error fails
    only its request (`Row.fail`); a failed decode step, which no row caused alone, raises.
    """
    device = model.transformer.wpe.weight.device
    states, broken = [], []
    for r in rows:
        try:
            states.append(_RowState(r, tokenizer_text, eos_id))
        except Exception as error:  # noqa: BLE001 - reported to the row's request once every row is set up
            broken.append((r, error))
    for r, error in broken:
        _fail(states, r, error)
    if not (states := [st for st in states if not st.finished]):
        return
    longest = max(len(st.context) for st in states)
    pad = torch.tensor([longest - len(st.context) for st in states])  # (B,)
    idx = torch.full((len(states), longest), eos_id, dtype=torch.long)  # (B, L)
    for b, st in enumerate(states):
        idx[b, pad[b]:] = torch.tensor(st.context, dtype=torch.long)
    # Only the last position's logits, unless a prompt is echoed with its log-probabilities.
    whole = any(st.row.sampling.echo and st.row.sampling.logprobs is not None for st in states)
    logits_at = None if whole else torch.tensor([longest - 1], device=device)
    try:
        cache = model.new_cache(len(states), device, pad=pad)
        logits, _ = model(idx.to(device), cache=cache, logits_at=logits_at)  # (B, L or 1, V)
    except Exception:
        requests = _by_request(states)
        if len(requests) < 2:
            raise
        for alone in requests:  # nothing has been sent yet: each request starts again on its own
            try:
                generate_batch(model, tokenizer_text, alone, eos_id)
            except Exception as error:  # noqa: BLE001 - this request fails by itself
                _fail([], alone[0], error)
        return
    _each_live_row(states, lambda b, st: _send_prompt(st, logits[b, int(pad[b]):] if whole else None, tokenizer_text))
    logits = logits[:, -1, :].float()  # (B, V)
    first = True
    while True:
        next_ids = torch.full((len(states), 1), eos_id, dtype=torch.long)  # (B, 1): finished rows feed eos

        def step(b: int, st: _RowState) -> None:
            next_ids[b, 0] = sample_next(st, logits[b], tokenizer_text, first)

        _each_live_row(states, step)
        first = False
        if all(st.finished for st in states):
            return
        logits, _ = model(next_ids.to(device), cache=cache)  # (B, 1, V)
        logits = logits[:, -1, :].float()  # (B, V)

"""Text generation on the KV cache: `generate` for evaluation and benchmarks, `generate_batch` for the endpoint.

Pure PyTorch + tokenizers (no Ray, no HTTP), so it is tested in one process.

`generate` extends a batch of equal-length prompts with one set of sampling settings
(temperature, top_k) and returns the token ids.

For the endpoint's static engine, `generate_batch` left-pads the rows' prompts (components/rows.py
`Row`) into one (B, L) batch, runs one prefill and then one decode step per token for the whole
batch until its longest completion ends. Each row is sampled, healed and streamed by its own
`_RowState` (components/rows.py), which the continuous engine (components/continuous.py) shares.
A batched prefill that raises is run again one request at a time (nothing has been sent yet then).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch.nn import functional as F

# The per-row pieces (sampling, stops, streamed deltas) are shared with the continuous engine.
from components.rows import Row, TokenText, _by_request, _each_live_row, _fail, _RowState, _send_prompt, sample_next

if TYPE_CHECKING:
    from components.model import GPT


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
) -> torch.Tensor:
    """Extend each row of `idx` (B, T) by up to `max_new_tokens` tokens sampled from `model`.

    With `use_cache`, the prompt is run once (prefill) and each later step feeds only the
    newest token, reusing the keys and values of the earlier ones: a step costs O(context)
    instead of O(context^2). Past `block_size` tokens the context is cropped to the last
    `block_size`; every position then shifts, so the cache is rebuilt from the cropped
    context at each step, exactly as without it. Both paths give the same tokens.

    Args:
        temperature: softmax temperature; 0 means greedy (argmax).
        top_k: sample only among the k most likely tokens.
        eos_id: once a row has produced it, that row is padded with eos_id; generation
            stops early when every row has.
        generator: torch.Generator for reproducible sampling.
        use_cache: decode incrementally with a KVCache (False recomputes the whole context
            at every step; kept as the reference the cache is tested against).
        on_token: called with each new (B, 1) token tensor as soon as it is chosen
            (evaluation times the steps with it; streaming can send it).

    Returns:
        (B, T + n) long tensor, n <= max_new_tokens. Call `model.eval()` first for dropout.
    """
    block_size = model.config.block_size
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)  # (B,)
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])  # (B, <=block_size, vocab_size)
        elif cache is None or cache.length >= block_size:
            cache = model.new_cache(idx.size(0), idx.device)  # prefill (again, once the context is full)
            logits, _ = model(idx[:, -block_size:], cache=cache)
        else:
            logits, _ = model(idx[:, -1:], cache=cache)  # (B, 1, vocab_size): the newest token only
        logits = logits[:, -1, :].float()  # (B, vocab_size): last position only
        if temperature == 0:
            idx_next = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))  # (B, k)
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits, dim=-1)  # (B, vocab_size)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
        if eos_id is not None:
            idx_next = idx_next.masked_fill(finished.unsqueeze(1), eos_id)
            finished |= idx_next.squeeze(1) == eos_id
        if on_token is not None:
            on_token(idx_next)
        idx = torch.cat((idx, idx_next), dim=1)  # (B, T + 1)
        if eos_id is not None and bool(finished.all()):
            break
    return idx

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
    try:
        cache = model.new_cache(len(states), device, pad=pad)
        logits, _ = model(idx.to(device), cache=cache)  # (B, L, V)
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
    _each_live_row(states, lambda b, st: _send_prompt(st, logits[b, int(pad[b]):], tokenizer_text))
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

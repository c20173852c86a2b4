"""The KV cache of the continuous engine: one slot per running row, each row at its own length.

One forward of the continuous engine is one packed sequence (1, N): every row's new tokens side
by side, a decoding row's one token and a joining row's prompt (or a chunk of it). The linear layers
do not care which row a token belongs to, so no token is padded; only attention does, and
`attend` (which `CausalSelfAttention` calls instead of its own attention when the cache has one)
splits the sequence by row again:
- the rows that feed one token: on the CPU in float32, each attends over its own slot up to its own
  length, in one call of a compiled kernel (components/decode_attention.py); elsewhere (a GPU, or
  another dtype) they attend together, as one batch over a prefix of the slots (a view of the cache,
  no gather), each query masked to its own row's keys;
- a row that feeds several tokens (a prompt chunk) attends over its own slot, causally.

Why one slot per row, each up to `capacity` positions: it is the simplest layout in which a row
joining the batch never copies the others' caches (it prefills into its own slot) and a row leaving
frees its slot by forgetting its length (the stale keys stay masked until the next occupant
overwrites them). The slots are allocated once; their positions are not: `capacity` grows in steps of
`POSITION_STEP` as the longest row needs them (never past the model's context) and shrinks back once
the rows that needed them have left (when what the rows need fits in half). So memory follows the
longest running row (`slots x n_layer x 2 x capacity x n_embd` values), and a short load's attention
reads a short cache. Paging the cache in blocks would follow every row's own length, at the cost of
gathering a row's blocks at every step.

Why a kernel for the one-token rows on the CPU: decoding attention is memory-bound, and the batched
call reads every slot as far as the longest row, masked; on a mixed load that is over twice what the
rows need, and it was where a step's time went. Cheaper layouts for the batched call were measured
and did not pay (benchmarks/RESULTS.md): a view up to the longest row rather than the whole
capacity (on one 2-core CPU a batched matmul over a strided view ran at half the speed of one over a
contiguous tensor), one call per row, length buckets gathered by copying, rows kept sorted by length
in slots with each group of slots read to its own longest row. The masked batch remains the path on
a GPU, where SDPA's fused kernels run it.

Lengths live on the host (plain ints): planning a step reads them and must not wait for the device.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional as F

from components.decode_attention import decode_attention

if TYPE_CHECKING:
    from components.model import GPTConfig


class _Plan:
    """What one packed forward feeds: per token its slot and position; how attention splits it."""

    def __init__(self, feeds: list[tuple[int, int]], lengths: list[int], capacity: int, device: torch.device,
                 dtype: torch.dtype, kernel: bool):
        singles = [(s, n) for s, n in feeds if n == 1]
        self.n_single = len(singles)
        slots, positions = [], []
        for s, n in feeds:
            slots += [s] * n
            positions += range(lengths[s], lengths[s] + n)
        self.tokens = len(slots)
        self.slot, self.position = torch.tensor((slots, positions), dtype=torch.long, device=device)  # 2 x (N,)
        self.chunks = []  # (slot, start, n, offset in the packed sequence) of rows feeding several tokens
        offset = self.n_single
        for s, n in feeds[self.n_single:]:
            self.chunks.append((s, lengths[s], n, offset))
            offset += n
        single_slots = [s for s, _ in singles]
        self.kernel = kernel and bool(singles)
        if self.kernel:  # components/decode_attention.py: each row read up to its own length
            self.kernel_slots = np.array(single_slots, dtype=np.int64)  # (D,)
            self.kernel_seen = np.array([lengths[s] + 1 for s in single_slots], dtype=np.int64)  # its new key too
        elif singles:
            self.upto = max(single_slots) + 1  # attention runs over slots 0 .. upto-1
            self.single_slots = self.slot[: self.n_single]
            # Every slot of the prefix decodes (the usual case): queries and outputs need no scatter.
            self.dense = single_slots == list(range(self.upto))
            seen = torch.tensor(lengths[: self.upto], dtype=torch.long, device=device)  # (upto,)
            # Row b sees keys 0 .. lengths[b] (its new one included); a slot without a one-token row
            # sees at least key 0, so no row is all-masked (NaN).
            allowed = torch.arange(capacity, device=device)[None, :] <= seen[:, None]  # (upto, capacity)
            self.allowed = allowed[:, None, None, :]  # (upto, 1, 1, capacity)
            if device.type == "cpu":  # the CPU path adds it to the scores (`_one_query_attention`)
                self.bias = torch.where(self.allowed, 0.0, -math.inf).to(dtype)


POSITION_STEP = 32  # the cache's positions per slot grow and shrink in steps of this many


class SlotCache:
    """Keys and values of `slots` rows, per layer, each slot filled up to `lengths[slot]` positions.

    Before each forward, `plan(feeds)` says what it is: `(slot, n)` per row, that row's next n tokens
    (at positions lengths[slot] ..), one-token rows first, in the order of the packed sequence. Once
    the forward has returned, `commit()` counts the new positions (not before: a forward that raised
    half-way leaves the lengths as they were, so it can be run again).
    """

    def __init__(self, config: GPTConfig, slots: int, device: torch.device | str, dtype: torch.dtype):
        self._shape = (slots, config.n_head, config.n_embd // config.n_head)  # (S, nh, hs)
        self.device, self.dtype = torch.device(device), dtype
        self.block_size = config.block_size
        self.capacity = 0  # positions allocated per slot
        self.k = [self._empty(0) for _ in range(config.n_layer)]  # per layer (S, nh, capacity, hs)
        self.v = [self._empty(0) for _ in range(config.n_layer)]
        self.lengths = [0] * slots  # positions filled per slot
        self._feeds: list[tuple[int, int]] = []
        self._plan: _Plan | None = None
        # float32 on the CPU: the decoding rows' attention reads each row to its own length
        # (components/decode_attention.py); elsewhere one batched call over the slots, masked.
        self.kernel = self.device.type == "cpu" and dtype == torch.float32

    def plan(self, feeds: list[tuple[int, int]]) -> None:
        needed = max([self.lengths[s] + n for s, n in feeds] + self.lengths)
        fitting = min(self.block_size, -(-needed // POSITION_STEP) * POSITION_STEP)
        if needed > self.capacity or fitting <= self.capacity // 2:
            self._resize(fitting)
        self._feeds = feeds
        self._plan = _Plan(feeds, self.lengths, self.capacity, self.device, self.dtype, self.kernel)

    def _empty(self, capacity: int) -> torch.Tensor:
        S, nh, hs = self._shape
        return torch.zeros((S, nh, capacity, hs), device=self.device, dtype=self.dtype)

    def _resize(self, capacity: int) -> None:
        """Every layer's keys and values in new tensors of `capacity` positions, the filled ones copied."""
        keep = min(self.capacity, capacity)
        for cache in (self.k, self.v):
            for layer, old in enumerate(cache):
                cache[layer] = self._empty(capacity)
                cache[layer][:, :, :keep] = old[:, :, :keep]
        self.capacity = capacity

    def commit(self) -> None:
        for s, n in self._feeds:
            self.lengths[s] += n
        self._feeds, self._plan = [], None

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    # ------------------------------------------------------------------ what GPT.forward asks

    @property
    def length(self) -> int:
        """GPT.forward checks `length + T` against the context; here T counts the tokens of many rows,
        each of which stays within the context (the engine checks them), so this never refuses a step."""
        return min(0, self.block_size - self._plan.tokens) if self._plan is not None else 0

    pad = None  # attention goes through `attend`, never through a padding mask

    def positions(self, T: int) -> torch.Tensor:
        """(1, N): each packed token's position in its own row."""
        return self._plan.position[None, :]

    def advance(self, T: int) -> None:
        """Nothing: `commit` counts the positions once the whole forward has returned."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the packed `k`, `v` (1, nh, N, hs) in their slots; attention of `q` (1, nh, N, hs), each
        token over its own row's keys. Returns (1, nh, N, hs)."""
        p, kc, vc = self._plan, self.k[layer], self.v[layer]
        if p.kernel:  # the kernel stores the one-token rows' keys and values; the chunks' go in by slices
            for slot, start, n, offset in p.chunks:
                kc[slot, :, start: start + n] = k[0, :, offset: offset + n]
                vc[slot, :, start: start + n] = v[0, :, offset: offset + n]
            singles = slice(0, p.n_single)
            ys = decode_attention(q[0, :, singles].transpose(0, 1), kc, vc, p.kernel_slots, p.kernel_seen,
                                  k[0, :, singles].transpose(0, 1), v[0, :, singles].transpose(0, 1))
            if not p.chunks:  # (D, nh, hs)
                return ys.transpose(0, 1)[None]
        else:
            kc[p.slot, :, p.position] = k[0].transpose(0, 1)  # (N, nh, hs)
            vc[p.slot, :, p.position] = v[0].transpose(0, 1)
        if not p.kernel and p.n_single:
            q1 = q[0, :, : p.n_single].transpose(0, 1)[:, :, None]  # (D, nh, 1, hs)
            if not p.dense:  # slots without a one-token row query nothing useful
                q1 = q.new_zeros(p.upto, *q1.shape[1:]).index_copy_(0, p.single_slots, q1)
            ys = _one_query_attention(q1, kc[: p.upto], vc[: p.upto], p)
            ys = ys[:, :, 0] if p.dense else ys[p.single_slots, :, 0]  # (D, nh, hs)
            if not p.chunks:
                return ys.transpose(0, 1)[None]
        y = torch.empty_like(q[0])  # (nh, N, hs)
        if p.n_single:
            y[:, : p.n_single] = ys.transpose(0, 1)
        for slot, start, n, offset in p.chunks:
            qc = q[:, :, offset: offset + n]  # (1, nh, n, hs)
            kr, vr = kc[slot: slot + 1, :, : start + n], vc[slot: slot + 1, :, : start + n]
            if start == 0:
                yc = F.scaled_dot_product_attention(qc, kr, vr, is_causal=True)
            else:  # a later chunk: query i sits at position start + i
                mask = torch.ones(n, start + n, dtype=torch.bool, device=q.device).tril(diagonal=start)
                yc = F.scaled_dot_product_attention(qc, kr, vr, attn_mask=mask)
            y[:, offset: offset + n] = yc[0]
        return y[None]


def _one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: _Plan) -> torch.Tensor:
    """(B, nh, 1, hs) queries over contiguous (B, nh, capacity, hs) keys and values, masked per row.

    The path on a GPU, and on the CPU for dtypes other than float32 (float32 uses the kernel). On the
    CPU two batched matmuls beat SDPA on one machine (0.72 against 1.04 ms a layer over 251 contiguous
    positions, 32 rows, 4 heads of 32) and were 5% behind it on another; on a GPU SDPA's fused kernels
    are the faster path."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=p.allowed)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.size(-1))) + p.bias  # (B, nh, 1, K)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype) @ v

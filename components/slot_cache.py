"""The KV cache of the continuous engine: one slot per running row, each row at its own length.

`GPT.forward` uses it as it uses a `KVCache` (components/kv_cache.py): position ids from
`positions`, the attention mask from `padding_mask` (whenever `pad` is not None), the layers'
keys and values through `update`, and `advance` once every layer has written. What differs is
that the rows of one forward are not aligned: each slot has its own `lengths[slot]`, so a decode
step writes each row's new key at that row's own position and masks every key past it.

Why preallocated, for `slots` rows and the model's whole context: it is the simplest layout in
which a row joining the batch never copies the others' caches (it prefills into its own slot) and
a row leaving frees its slot by forgetting its length (the stale keys stay masked until the next
occupant's prefill overwrites them). The price is memory for every slot at full context
(`slots x n_layer x 2 x block_size x n_embd` values) whether or not it is used; paging the cache
in blocks would save that, at the cost of gathering a row's blocks at every step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from components.model import GPTConfig


class SlotCache:
    """Keys and values of `slots` rows, per layer, each slot filled up to `lengths[slot]` positions.

    Before each forward, say what it is: `prefill(slots, lengths)` (those slots' prompts, right-padded
    to one (B, T) batch, from position 0) or `decode(upto, live)` (one token for each of slots
    0 .. upto-1; the slots that hold no row feed a dummy token that writes at position 0 and is never
    counted). Decoding over a prefix of the slots lets the keys be a view, not a gather; new rows take
    the lowest free slots, so the prefix stays short.
    """

    def __init__(self, config: GPTConfig, slots: int, device: torch.device | str, dtype: torch.dtype):
        hs = config.n_embd // config.n_head
        shape = (slots, config.n_head, config.block_size, hs)  # (S, nh, block_size, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.block_size = config.block_size
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (S,) positions filled per slot
        self._slots: torch.Tensor | None = None  # prefill: the (B,) slots being filled
        self._prompt_lengths: torch.Tensor | None = None  # prefill: their (B,) prompt lengths
        self._upto = 0  # decode: slots 0 .. upto-1
        self._live: torch.Tensor | None = None  # decode: (upto,) bool, the slots that hold a row
        self._longest = 0  # decode: the longest of those rows before this step

    # ------------------------------------------------------------------ what the next forward is

    def prefill(self, slots: list[int], lengths: list[int]) -> None:
        device = self.lengths.device
        self._slots = torch.tensor(slots, dtype=torch.long, device=device)
        self._prompt_lengths = torch.tensor(lengths, dtype=torch.long, device=device)

    def decode(self, upto: int, live: torch.Tensor) -> None:
        self._slots, self._upto, self._live = None, upto, live.to(self.lengths.device)
        self._longest = int(self.lengths[:upto].max())  # read by every layer: computed once

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0

    # ------------------------------------------------------------------ what GPT.forward asks

    @property
    def length(self) -> int:
        """The longest row of this forward before it (GPT.forward checks it against the context)."""
        return 0 if self._slots is not None else self._longest

    @property
    def pad(self) -> torch.Tensor | None:
        """Not None while decoding: the rows are not aligned, so attention takes `padding_mask`."""
        return None if self._slots is not None else self.lengths[: self._upto]

    def positions(self, T: int) -> torch.Tensor:
        """(T,) from 0 for a prefill; (B, 1), each row's own length, for a decode step."""
        if self._slots is not None:
            return torch.arange(T, dtype=torch.long, device=self.lengths.device)
        return self.lengths[: self._upto, None]

    def padding_mask(self, T: int) -> torch.Tensor:
        """(B, 1, 1, longest + 1) bool for a decode step: row b sees its keys 0 .. lengths[b] only.

        A slot without a row has length 0 and sees its own dummy key: never an all-masked row (NaN)."""
        keys = torch.arange(self.length + 1, device=self.lengths.device)  # (longest + 1,)
        return (keys[None, :] <= self.lengths[: self._upto, None])[:, None, None, :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (B, nh, T, hs) in the slots of this forward; return the keys and values to attend to."""
        if self._slots is not None:  # prefill from position 0: the prompt attends to itself only
            self.k[layer][self._slots, :, : k.size(2)] = k
            self.v[layer][self._slots, :, : v.size(2)] = v
            return k, v
        rows = torch.arange(self._upto, device=k.device)
        at = self.lengths[: self._upto]  # (B,) each row's next position
        self.k[layer][rows, :, at] = k[:, :, 0]  # (B, nh, hs)
        self.v[layer][rows, :, at] = v[:, :, 0]
        end = self.length + 1
        return self.k[layer][: self._upto, :, :end], self.v[layer][: self._upto, :, :end]  # views, no copy

    def advance(self, T: int) -> None:
        """Every layer has written: the slots of this forward now hold their new positions."""
        if self._slots is not None:
            self.lengths[self._slots] = self._prompt_lengths
            self._slots = None
        else:
            self.lengths[: self._upto] += self._live.long()

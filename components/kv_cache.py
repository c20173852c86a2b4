"""The KV cache of incremental decoding.

`GPT.new_cache` builds one; `GPT.forward` takes its position ids (and, with left padding,
its attention mask) from it, and each attention layer writes its keys and values into it
with `update`; `advance` counts the new positions once every layer has written. The model
module imports this one, so this one takes the GPTConfig only as a type.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from components.model import GPTConfig


class KVCache:
    """Keys and values of the tokens already seen, per layer, for incremental decoding.

    Preallocated to `block_size` positions so that a decode step writes one column in
    place instead of concatenating (and copying) the whole history. `length` counts the
    positions filled; `GPT.forward` advances it after every layer has written.

    `pad` (B,) batches prompts of different lengths: row b starts with pad[b] padding
    positions (left padding), which no query attends to and which do not count as
    positions, so each row computes exactly what it would alone.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device: torch.device | str, dtype: torch.dtype,
                 pad: torch.Tensor | None = None):
        hs = config.n_embd // config.n_head
        shape = (batch_size, config.n_head, config.block_size, hs)  # (B, nh, block_size, hs)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0
        self.pad = None if pad is None else pad.to(device=device, dtype=torch.long)  # (B,)

    def positions(self, T: int) -> torch.Tensor:
        """Position ids of the next T tokens: (T,), or (B, T) counted from each row's first real token."""
        pos = torch.arange(self.length, self.length + T, dtype=torch.long, device=self.k[0].device)  # (T,)
        if self.pad is None:
            return pos
        return (pos[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T)

    def padding_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, length + T) bool: causal, and no real query sees a padding key.

        A padding query sees itself only: a row of SDPA with every key masked gives NaN,
        and a NaN value would poison later rows through `0 * NaN` even where masked.
        """
        past, device = self.length, self.k[0].device
        causal = torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)  # (T, past+T)
        keys = torch.arange(past + T, device=device)  # (past+T,)
        real_key = keys[None, :] >= self.pad[:, None]  # (B, past+T)
        itself = keys[None, :] == (past + torch.arange(T, device=device))[:, None]  # (T, past+T)
        return (causal[None] & (real_key[:, None, :] | itself[None]))[:, None]  # (B, 1, T, past+T)

    def advance(self, T: int) -> None:
        """Every layer has written the T new positions (`GPT.forward` calls it last)."""
        self.length += T

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `k`, `v` (B, nh, T, hs) after the cached positions; return all keys and values so far."""
        end = self.length + k.size(2)
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, length + T, hs) each

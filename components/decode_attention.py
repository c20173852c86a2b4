"""Attention of one new token per row over that row's own keys, on the CPU, compiled with numba.

The continuous engine's decoding rows each feed one token, and each row's keys fill its slot of the
cache (components/slot_cache.py) only up to its own length. A batched matmul has to read every slot
to the same length, the longest row's (masked), and on a mixed load that is more than twice what
the rows need; decoding attention is memory-bound, so its time follows what it reads. This kernel
loops over the rows and reads each one's keys and values only up to its own length: on a 2-core
x86_64 machine it took a 32-row step of the tiny model from 7.35 to 4.95 ms (benchmarks/RESULTS.md).

Why numba and not a C++ extension or FlexAttention: numba ships as a wheel and compiles the kernel
in about a second at first use (then from its cache), with no compiler on the machine. PyTorch's
FlexAttention with a block mask skips the unneeded blocks too, but on the CPU it needs
torch.compile (a C++ toolchain at run time, seconds of compilation per shape) and gained less than
this kernel (1.6-1.7 against 2.1 ms for the matmuls, 4 layers).

Numerics: float32 throughout, the sum over a row's keys in its own order, so a row's attention does
not depend on which other rows share the step, bit for bit (part of why a seeded request gives the
same text alone or in company). It differs from the batched matmuls by float rounding only (~1e-6).
The kernel runs on one thread, releasing the GIL: the endpoint's replica and the benchmarks run torch
on one thread too.
"""
from __future__ import annotations

import functools

import numpy as np
import torch


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: np.ndarray,
                     seen: np.ndarray) -> torch.Tensor:
    """Each query over its own slot's first keys.

    Args:
        q: (D, nh, hs) float32 CPU queries, one per decoding row.
        k, v: (S, nh, C, hs) float32 CPU contiguous cache: slot s's keys and values.
        slots: (D,) int64, the slot of each query.
        seen: (D,) int64, how many keys each query attends over (1 .. C): positions 0 .. seen-1.

    Returns:
        (D, nh, hs) float32: softmax(q . k / sqrt(hs)) @ v per row and head.
    """
    S, nh, C, hs = k.shape
    if q.shape != (len(slots), nh, hs) or v.shape != k.shape or len(seen) != len(slots):
        raise ValueError(f"decode_attention: queries {tuple(q.shape)}, keys {tuple(k.shape)}, values "
                         f"{tuple(v.shape)}, {len(slots)} slots and {len(seen)} lengths do not match")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    if not _kernel()(q.numpy(), k.numpy(), v.numpy(), slots, seen, out.numpy(), np.float32(hs ** -0.5)):
        raise ValueError(f"decode_attention: slots {slots.tolist()} or lengths {seen.tolist()} are out of "
                         f"range for a cache of {S} slots of {C} positions")
    return out


def prepare() -> None:
    """Compile the kernel now (or load it from numba's cache), so that the first request does not wait for it."""
    k = torch.zeros(1, 1, 1, 1)
    decode_attention(torch.zeros(1, 1, 1), k, k, np.zeros(1, dtype=np.int64), np.ones(1, dtype=np.int64))


@functools.cache
def _kernel():
    """`_attend` compiled (numba is imported, and the kernel compiled or loaded from its cache, on first use)."""
    import numba

    # reassoc and contract let the compiler vectorize the sums over a head's 32 or 64 values; no
    # flag that assumes away infinities or NaNs (the running maximum starts at minus infinity).
    return numba.njit(fastmath={"reassoc", "contract"}, nogil=True, cache=True)(_attend)


def _attend(q, k, v, slots, seen, out, scale):
    """The kernel, in the subset of Python numba compiles (see `decode_attention` for the arguments).

    Returns False, having computed nothing, when a slot or a length is out of range."""
    D, nh, hs = q.shape
    S, C = k.shape[0], k.shape[2]
    for d in range(D):  # numba does not check indices: out of range, the loops would read past the cache
        if not (0 <= slots[d] < S and 1 <= seen[d] <= C):
            return False
    scores = np.empty(C, dtype=np.float32)
    for d in range(D):
        s, n = slots[d], seen[d]
        for h in range(nh):
            qh, kh, vh, oh = q[d, h], k[s, h], v[s, h], out[d, h]
            top = np.float32(-np.inf)
            for t in range(n):
                acc = np.float32(0.0)
                for i in range(hs):
                    acc += qh[i] * kh[t, i]
                acc *= scale
                scores[t] = acc
                top = max(top, acc)
            total = np.float32(0.0)
            for t in range(n):
                e = np.exp(scores[t] - top)
                scores[t] = e
                total += e
            for i in range(hs):
                oh[i] = 0.0
            inv = np.float32(1.0) / total
            for t in range(n):
                w = scores[t] * inv
                for i in range(hs):
                    oh[i] += w * vh[t, i]
    return True

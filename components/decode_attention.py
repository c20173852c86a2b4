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


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: np.ndarray, seen: np.ndarray,
                     new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None) -> torch.Tensor:
    """Each query over its own slot's first keys.

    Args:
        q: (D, nh, hs) float32 CPU queries, one per decoding row.
        k, v: (S, nh, C, hs) float32 CPU contiguous cache: slot s's keys and values.
        slots: (D,) int64, the slot of each query.
        seen: (D,) int64, how many keys each query attends over (1 .. C): positions 0 .. seen-1.
        new_k, new_v: (D, nh, hs), when given: each row's new key and value, which the kernel stores at
            position seen-1 of its slot before it attends (in place in `k`, `v`: one pass, where an
            indexed assignment beforehand cost about 1 µs per row and layer more).

    Returns:
        (D, nh, hs) float32: softmax(q . k / sqrt(hs)) @ v per row and head.
    """
    S, nh, C, hs = k.shape
    write = new_k is not None
    if (q.shape != (len(slots), nh, hs) or v.shape != k.shape or len(seen) != len(slots)
            or write and not (new_k.shape == new_v.shape == q.shape)):
        news = f", new keys {tuple(new_k.shape)} and values {tuple(new_v.shape)}" if write else ""
        raise ValueError(f"decode_attention: queries {tuple(q.shape)}, keys {tuple(k.shape)}, values "
                         f"{tuple(v.shape)}{news}, {len(slots)} slots and {len(seen)} lengths do not match")
    if not (k.is_contiguous() and v.is_contiguous()):
        raise ValueError("decode_attention: the cache's keys and values must be contiguous (the kernel writes them in place)")
    q = q.contiguous()
    new_k, new_v = (new_k.contiguous(), new_v.contiguous()) if write else (q, q)
    out = torch.empty_like(q)
    if not _kernel()(q.numpy(), k.numpy(), v.numpy(), slots, seen, write, new_k.numpy(), new_v.numpy(), out.numpy(),
                     np.float32(hs ** -0.5)):
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


# exp(x) for x <= 0 as 2 ** whole * exp(r), with exp(r) a polynomial (Cephes' expf: within about one
# float32 rounding of the exact value; ln 2 split in two so that whole * ln 2 comes off exactly).
_LOG2E = np.float32(1.44269504088896341)
_LN2_HIGH, _LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)
_EXP_P0, _EXP_P1, _EXP_P2 = np.float32(1.9875691500e-4), np.float32(1.3981999507e-3), np.float32(8.3334519073e-3)
_EXP_P3, _EXP_P4, _EXP_P5 = np.float32(4.1665795894e-2), np.float32(1.6666665459e-1), np.float32(5.0000001201e-1)


def _attend(q, k, v, slots, seen, write, new_k, new_v, out, scale):
    """The kernel, in the subset of Python numba compiles (see `decode_attention` for the arguments;
    `write`: store `new_k`, `new_v` first).

    Returns False, having written and computed nothing, when a slot or a length is out of range."""
    D, nh, hs = q.shape
    S, C = k.shape[0], k.shape[2]
    for d in range(D):  # numba does not check indices: out of range, the loops would read past the cache
        if not (0 <= slots[d] < S and 1 <= seen[d] <= C):
            return False
    scores = np.empty(C, dtype=np.float32)
    twos = np.empty(C, dtype=np.int32)
    powers = twos.view(np.float32)  # the same memory: 2 ** whole, from its bits
    for d in range(D):
        s, n = slots[d], seen[d]
        for h in range(nh):
            qh, kh, vh, oh = q[d, h], k[s, h], v[s, h], out[d, h]
            if write:
                kh[n - 1] = new_k[d, h]
                vh[n - 1] = new_v[d, h]
            top = np.float32(-np.inf)
            for t in range(n):
                acc = np.float32(0.0)
                for i in range(hs):
                    acc += qh[i] * kh[t, i]
                acc *= scale
                scores[t] = acc
                top = max(top, acc)
            # exp(score - top), vectorized: a libm call per score would keep this loop scalar
            for t in range(n):
                x = max(scores[t] - top, np.float32(-87.0))  # below: exp underflows past float32's normals
                whole = np.floor(x * _LOG2E + np.float32(0.5))  # x = whole * ln 2 + r, |r| <= ln 2 / 2
                r = x - whole * _LN2_HIGH - whole * _LN2_LOW
                p = ((((_EXP_P0 * r + _EXP_P1) * r + _EXP_P2) * r + _EXP_P3) * r + _EXP_P4) * r + _EXP_P5
                scores[t] = p * r * r + r + np.float32(1.0)  # exp(r)
                twos[t] = (np.int32(whole) + np.int32(127)) << np.int32(23)  # the bits of 2 ** whole
            total = np.float32(0.0)
            for t in range(n):
                e = scores[t] * powers[t]
                scores[t] = e
                total += e
            # The weighted sum of the values, then one division by the total (dividing each weight
            # instead put a division into every step of the loop over the keys).
            for i in range(hs):
                oh[i] = 0.0
            for t in range(n):
                w = scores[t]
                for i in range(hs):
                    oh[i] += w * vh[t, i]
            inv = np.float32(1.0) / total
            for i in range(hs):
                oh[i] *= inv
    return True

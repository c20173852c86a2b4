"""What the samplers (components/generation.py) accept; the experiment file and the endpoint check the same limits."""
from __future__ import annotations

import math

MIN_TEMPERATURE = 1e-3
"""Smallest non-zero temperature. `logits / temperature` overflows float32 to inf (and
softmax to NaN) for temperatures near 1e-38; far above that, anything below 1e-3 is greedy anyway."""
MAX_TEMPERATURE = 2.0
"""The OpenAI API's upper limit; hotter sampling is noise."""
MIN_TOP_P = 1e-9
"""Smallest `top_p`. The most likely token always has a probability of at least 1/vocabulary, so
with fewer than a billion tokens 1e-9 already keeps that token alone; a smaller value changes
nothing and may not even exist in float32 (1e-46 is 0 there), so it is refused as a mistake."""
MAX_SEED = 2**63 - 1
"""`torch.Generator.manual_seed` takes 64-bit seeds; non-negative int64 is what JSON clients send exactly."""


def temperature_problem(value: float) -> str | None:
    """Why the sampler cannot use `value` as its temperature, or None when it can."""
    if not math.isfinite(value) or value < 0 or value > MAX_TEMPERATURE or 0 < value < MIN_TEMPERATURE:
        return (f"must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, got {value!r}")
    return None


def top_p_problem(value: float) -> str | None:
    """Why the nucleus sampler cannot use `value` as its `top_p`, or None when it can."""
    if not math.isfinite(value) or not MIN_TOP_P <= value <= 1:
        return f"must be between {MIN_TOP_P:g} and 1, got {value!r}"
    return None


def seed_problem(value: int) -> str | None:
    """Why `value` cannot seed the sampler's torch.Generator, or None when it can."""
    if not 0 <= value <= MAX_SEED:
        return f"must be between 0 and {MAX_SEED} (2**63 - 1), got {value}"
    return None

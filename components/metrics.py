"""The metric names every promotion candidate logs, in one place.

`pipelines/stages.py: evaluate` logs these for every candidate (from
`components/evaluate.py` plus the parameter counts), so `promote.metric` and
`promote.tie_breaker` can be checked against them when the experiment loads
instead of failing at promotion after the whole run. A new candidate metric is
added here and logged by the evaluate stage.
"""
from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16", "int8")
"""Dtypes every candidate reports `model/bytes_<dtype>` for (zero where absent)."""

CANDIDATE_METRICS = (
    "eval/val_loss",
    "eval/val_ppl",
    "eval/completion_loss",
    "eval/completion_ppl",
    "eval/tokens_per_s",
    "eval/ms_per_token",
    "model/size_bytes",
    "model/params_total",
    *(f"model/bytes_{dtype}" for dtype in DTYPES),
)
"""Every metric a candidate run logs; the names promotion may decide and break ties on."""

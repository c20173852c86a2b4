"""The metric names every promotion candidate logs, in one place.

`pipelines/stages.py: evaluate` logs these for every candidate (from
`components/evaluate.py`), so `promote.metric` and
`promote.tie_breaker` can be checked against them when the experiment loads
instead of failing at promotion after the whole run. A new candidate metric is
added here and logged by the evaluate stage.
"""
from __future__ import annotations

# Every dtype a variant stores, in memory and on disk; zero where a candidate has none, so that
# every candidate logs the same keys.
DTYPES = ("float32", "bfloat16", "float16", "float64", "int64", "int32", "int8", "uint8")

QUALITY_METRICS = (
    "eval/val_loss", "eval/val_ppl", "eval/val_accuracy",
    "eval/completion_loss", "eval/completion_ppl", "eval/completion_accuracy",
    "eval/val_bpb", "eval/completion_bpb",  # bits per UTF-8 byte, each model with its own tokenizer
)
# On the experiment's evaluation suite (components/suite.py): the same text for every run, whatever its
# data, so these compare a retrain with the champion. The pipeline always has a suite.
SUITE_METRICS = ("eval/suite_bpb", "eval/suite_completion_bpb")
SPEED_METRICS = (
    "eval/tokens_per_s",  # batch 1, KV cache, new tokens per second (prefill included)
    "eval/tokens_per_s_batch8",  # the same prompts as one batch of 8
    "eval/ms_per_token",  # 1000 / eval/tokens_per_s
    "eval/ttft_ms",  # time to first token at batch 1: prefill + first sample, median over prompts
    "eval/token_ms_p50", "eval/token_ms_p95",  # per decode step after the first token, batch 1
    "eval/peak_mem_bytes",  # see _peak_memory
    "eval/on_cuda", "eval/cpu_threads",  # where it ran: 1/0, and torch's CPU threads
)
SIZE_METRICS = (
    "model/size_bytes",  # the stored weights file
    "model/params_total",
    "model/linear_bytes", "model/disk_linear_bytes",  # the blocks' Linear layers, in memory and on disk
    *(f"model/bytes_{d}" for d in DTYPES), "model/bytes_other",
    *(f"model/disk_bytes_{d}" for d in DTYPES), "model/disk_bytes_other",
)
# Against the reference candidate (fp32 when it is one), added by `compare` once all are measured.
DELTA_METRICS = (
    "eval/val_ppl_delta_pct",  # 100 * (ppl / reference ppl - 1)
    "eval/val_accuracy_delta", "eval/completion_loss_delta", "eval/completion_accuracy_delta",  # differences
    "eval/speedup",  # eval/tokens_per_s / the reference's
    "model/size_ratio",  # model/size_bytes / the reference's
)
CANDIDATE_METRICS = (*QUALITY_METRICS, *SUITE_METRICS, *SPEED_METRICS, *SIZE_METRICS, *DELTA_METRICS)
"""Every metric a candidate run logs; `promote.metric` must be one of them."""

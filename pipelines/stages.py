"""The stages as they run inside the pipeline: a component plus its logging.

Each function takes the experiment config, the previous stage's output record
and the `RunLogger` of its MLflow run, and returns its own output record.
`prepare_data`, `quantize` and `evaluate` run as Ray tasks; `pretrain` and
`finetune` drive Ray Train from the driver.
"""
from __future__ import annotations

import os
from dataclasses import replace

from components import comparison
from components import data as data_lib
from components import evaluate as evaluate_lib
from components import model as gpt
from components import quantize as quantize_lib
from components.artifacts import Checkpoint, EvalReport, QuantizedModel, TokenizedData
from components.config import ConfigError, ExperimentConfig, data_parallel_workers
from components.files import write_checksums
from pipelines import ray_runtime
from pipelines.tracking import CHECKSUMS_TAG, PROGRESS_TAG, RunLogger


# ------------------------------------------------------------------- data


def prepare_data(cfg: ExperimentConfig, out_dir: str, logger: RunLogger) -> TokenizedData:
    """Ray task: corpus -> tokenizer -> packed parquet shards + SFT pairs."""
    result = data_lib.prepare_data(
        out_dir,
        source=cfg.data.source, text_field=cfg.data.text_field, max_bytes=cfg.data.max_bytes,
        block_size=cfg.data.block_size, val_fraction=cfg.data.val_fraction,
        vocab_size=cfg.tokenizer.vocab_size,
        sft_source=cfg.finetune.source, sft_max_bytes=cfg.finetune.max_bytes,
        sft_max_pairs=cfg.finetune.max_pairs, sft_heldout_fraction=cfg.finetune.heldout_fraction,
        progress=lambda message: logger.set_tags({PROGRESS_TAG: message}),
    )
    logger.log_metrics({f"data/{k}": v for k, v in result.stats.items()})
    logger.log_params(parameter_count_params(model_config(cfg, result)))
    logger.set_tags({"data.fingerprint": result.fingerprint})
    # The tokenizer and manifest describe the data; the shards stay in the workdir (they grow with the corpus).
    for path in (result.tokenizer_uri, result.manifest_uri):
        logger.log_artifact(path, "data")
    return result


def source_fingerprint(cfg: ExperimentConfig) -> str:
    """Fingerprint of the documents the data stage reads (corpus + SFT source): its cache key's data part,
    and what the new-data trigger of `gptforge schedule` watches."""
    return data_lib.source_fingerprint(cfg.data.source, text_field=cfg.data.text_field,
                                       max_bytes=cfg.data.max_bytes, sft_source=cfg.finetune.source,
                                       sft_max_bytes=cfg.finetune.max_bytes)


def model_config(cfg: ExperimentConfig, data: TokenizedData) -> gpt.GPTConfig:
    """The GPT this experiment trains: the preset, the YAML's overrides, the data's vocab and context."""
    m = cfg.model
    vocab = -(-data.vocab_size // m.pad_vocab_to) * m.pad_vocab_to  # rounded up to a multiple of pad_vocab_to
    return gpt.config_from_preset(
        m.preset, n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, dropout=m.dropout, bias=m.bias,
        vocab_size=vocab, block_size=data.block_size,
    )


def parameter_count_params(model_cfg: gpt.GPTConfig) -> dict:
    """Parameter counts of the experiment's model as MLflow params (`param_count.*`) plus FLOPs per token."""
    import torch

    with torch.device("meta"):  # shapes only: counting a gpt2-xl costs no memory
        counts = gpt.parameter_counts(gpt.GPT(model_cfg))
    params = {f"param_count.{k.replace('/', '.')}": v for k, v in counts.items()}
    params["model.flops_per_token"] = gpt.flops_per_token(model_cfg, counts["non_embedding"])
    return params


# --------------------------------------------------------------- training


def pretrain(cfg: ExperimentConfig, data: TokenizedData, storage: str, logger: RunLogger) -> Checkpoint:
    """Driver: train a fresh GPT on the packed rows with Ray Train (DDP or FSDP).

    The Ray Train run is named after the stage's MLflow run, so running this again for
    the same run (`gptforge run --resume`) continues from its newest checkpoint.
    """
    _check_one_step_of_data(data.stats["train_rows"], cfg.pretrain, "pretrain", "training rows", "data.source")
    spec = _train_spec(cfg.pretrain, f"pretrain-{logger.run_id}", model_config(cfg, data), data, logger)
    result = ray_runtime.fit(spec, data.train_uri, data.val_uri, ray_runtime.Workers.of(cfg.pretrain), storage)
    _log_model_files(result.checkpoint, logger)
    return Checkpoint(uri=result.checkpoint, step=cfg.pretrain.max_steps, metrics=logger.latest_metrics())


def finetune(cfg: ExperimentConfig, data: TokenizedData, pretrained: Checkpoint, storage: str,
             logger: RunLogger) -> Checkpoint:
    """Driver: continue from the pretrained checkpoint on prompt/completion pairs (loss on completions)."""
    ft = cfg.finetune
    _check_one_step_of_data(data.stats["sft_train_pairs"], ft, "finetune", "training pairs", "finetune.source")
    lora = {"rank": ft.lora_rank, "alpha": ft.lora_alpha} if ft.method == "lora" else None
    spec = _train_spec(ft, f"finetune-{logger.run_id}", gpt.read_config(pretrained.uri), data, logger,
                       init_from=pretrained.uri, lora=lora)
    result = ray_runtime.fit(spec, data.sft_train_uri, data.sft_heldout_uri, ray_runtime.Workers.of(ft), storage)
    _log_model_files(result.checkpoint, logger)
    return Checkpoint(uri=result.checkpoint, step=ft.max_steps, metrics=logger.latest_metrics())


def _train_spec(training, name: str, model_cfg: gpt.GPTConfig, data: TokenizedData, logger: RunLogger,
                init_from: str | None = None, lora: dict | None = None) -> ray_runtime.TrainSpec:
    return ray_runtime.TrainSpec(
        name=name, loop=ray_runtime.loop_fields(training, data.block_size), batch_size=training.batch_size,
        seed=training.seed, model_config=model_cfg.to_dict(), init_from=init_from, lora=lora,
        extra_files=(data.tokenizer_uri,), logger=logger, strategy=training.strategy, tp_degree=training.tp_degree,
        precision=training.precision, compile=training.compile, eval_batches=training.eval_batches,
    )


def _log_model_files(folder: str, logger: RunLogger) -> None:
    """The model as later stages load it; the optimizer state stays in Ray Train's storage."""
    for name in (gpt.WEIGHTS_FILE, gpt.CONFIG_FILE, "tokenizer.json"):
        logger.log_artifact(os.path.join(folder, name), "model")


def _check_one_step_of_data(rows: int, training, section: str, what: str, source_key: str) -> None:
    """Each worker's shard must fill one batch, or its epoch yields nothing to train on."""
    replicas = data_parallel_workers(training)  # a tensor-parallel group shares its rows
    needed = replicas * training.batch_size
    if rows < needed:
        raise data_lib.DataError(
            f"{source_key} gives {rows} {what}, fewer than one step needs "
            f"({replicas} data-parallel workers of {section}.num_workers={training.num_workers} x "
            f"{section}.batch_size={training.batch_size} = {needed}); "
            f"use more data or lower {section}.batch_size"
        )


# ------------------------------------------------------------- candidates


CANDIDATE_ARTIFACTS = "candidates"  # folder of the parent run holding the comparison


def quantize_wants_gpu(variant: str, cluster_gpus: float) -> bool:
    """int4_weight_only is packed on the GPU; every other variant is built on a CPU."""
    return cluster_gpus > 0 and "cpu" not in quantize_lib.RUNS_ON[variant]


def evaluate_wants_gpu(variant: str, cfg: ExperimentConfig, cluster_gpus: float) -> bool:
    """Whether the candidate's evaluation task should hold a GPU (see evaluate.device)."""
    return cluster_gpus > 0 and cfg.evaluate.device != "cpu" and "cuda" in quantize_lib.RUNS_ON[variant]


def quantize(finetuned: Checkpoint, variant: str, out_dir: str, logger: RunLogger) -> QuantizedModel:
    """Ray task: store the fine-tuned model as `variant`, with checksums, in the candidate's run.

    A variant that cannot be built here is skipped: its run gets the reason, not an error.
    """
    import torch

    logger.set_tags({"candidate.variant": variant})
    device = "cuda" if torch.cuda.is_available() and "cpu" not in quantize_lib.RUNS_ON[variant] else "cpu"
    try:
        result = quantize_lib.quantize_model(finetuned.uri, variant, out_dir, device)
    except quantize_lib.VariantUnavailable as why:
        logger.set_tags({"candidate.status": "skipped", "candidate.skip_reason": str(why)})
        return QuantizedModel(variant, "", 0, skipped=str(why))
    # Tagged before the upload: promotion pins this value on the registry version (CHECKSUMS_TAG).
    logger.set_tags({CHECKSUMS_TAG: write_checksums(out_dir)})
    logger.log_artifacts(out_dir, "model")
    logger.log_params({"candidate.variant": variant})
    return result


def evaluate(candidate: QuantizedModel, data: TokenizedData, cfg: ExperimentConfig, logger: RunLogger) -> EvalReport:
    """Ray task: measure one candidate where it runs fastest; log its metrics, samples and generations.

    The device follows `evaluate.device` (`components.quantize.pick_device`); on the CPU with
    `evaluate.cpu_threads` threads. A candidate that cannot run here is skipped, with the reason.
    """
    import torch

    if candidate.skipped:
        return EvalReport(candidate.variant, {}, skipped=candidate.skipped)
    e = cfg.evaluate
    try:
        device = quantize_lib.pick_device(candidate.variant, e.device, torch.cuda.is_available())
        model = quantize_lib.load_variant(candidate.uri, device)
    except quantize_lib.VariantUnavailable as why:
        logger.set_tags({"candidate.status": "skipped", "candidate.skip_reason": str(why)})
        return EvalReport(candidate.variant, {}, skipped=str(why))
    torch.set_num_threads(e.cpu_threads)  # every CPU candidate gets the same threads, so tokens/s compare fairly
    report = evaluate_lib.evaluate(
        model, variant=candidate.variant, val_uri=data.val_uri, sft_heldout_uri=data.sft_heldout_uri,
        tokenizer_uri=data.tokenizer_uri, size_bytes=candidate.size_bytes,
        disk_bytes=quantize_lib.stored_bytes(candidate.uri), max_batches=e.max_batches,
        batch_size=e.batch_size, gen_tokens=e.gen_tokens, num_samples=e.num_samples, temperature=e.temperature,
        prompts=e.prompts,
    )
    logger.log_metrics(report.metrics)
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    logger.set_tags({"candidate.status": "evaluated", "candidate.device": where})
    logger.log_dict({"samples": report.samples, "generations": report.generations}, "samples.json")
    return report


def compare(reports: list[EvalReport], runs: dict[str, RunLogger], out_dir: str, log: RunLogger,
            parent: RunLogger) -> list[EvalReport]:
    """Driver: deltas against the reference on every candidate run; the table, plots and
    generations as artifacts of the evaluate run and of the parent run (`candidates/`).

    Returns:
        the reports with their deltas.

    Raises:
        ConfigError: every candidate was skipped, so there is nothing to promote.
    """
    if all(r.skipped for r in reports):
        raise ConfigError("every candidate was skipped (check quantize.variants and evaluate.device): "
                          + "; ".join(f"{r.variant}: {r.skipped}" for r in reports))
    reports = evaluate_lib.add_deltas(reports)
    reference = evaluate_lib.reference_variant(reports)
    for r in reports:
        if not r.skipped:
            runs[r.variant].log_metrics({k: r.metrics[k] for k in evaluate_lib.DELTA_METRICS})
            runs[r.variant].set_tags({"candidate.reference": str(r.variant == reference).lower()})
    for path in comparison.write_comparison(reports, out_dir):
        log.log_artifact(path, CANDIDATE_ARTIFACTS)
        parent.log_artifact(path, CANDIDATE_ARTIFACTS)
    log.log_dict([{"variant": r.variant, "skipped": r.skipped, **r.metrics} for r in reports], "candidates.json")
    return reports

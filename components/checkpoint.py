"""Training checkpoints: what a restarted worker group or a resumed run continues from.

A checkpoint folder is a model folder that every later stage loads unchanged
(`model.safetensors` + `config.json`, full and unsharded even under FSDP and
tensor parallelism, LoRA merged) plus `trainer_state.pt` (optimizer state, step, each rank's RNG state
and data position, LoRA adapters) and `checkpoint.json`, written last, which
lists every file with its size: a folder whose files do not match it (a copy
cut short) is not used.

Saving and restoring are collectives when `torch.distributed` is initialised:
every rank calls them; only rank 0 writes. Plain torch, no Ray.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import safetensors.torch
import torch
import torch.distributed as dist
from torch import nn

from components import model as gpt
from components import storage, tensor_parallel
from components.files import write_json_atomic
from components.parallel import gather_from_ranks, tensor_parallel_layout, unwrap

TRAINER_STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "checkpoint.json"
ADAPTER_MARK = "lora_"  # parameter names of LoRA adapters (components/finetune.py)


def as_trained(module: nn.Module) -> nn.Module:
    """The export of a model stored as it is trained (no adapters to merge)."""
    return module


def save(folder: str | None, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
         data_position: dict, fresh_module: Callable[[], nn.Module],
         export: Callable[[nn.Module], gpt.GPT] = as_trained, extra_files: tuple[str, ...] = ()) -> None:
    """Write a checkpoint of `model` (as `parallelize` returned it) at `step` into `folder`.

    Args:
        folder: where rank 0 writes (other ranks pass None).
        data_position: this rank's `Batches.position()`.
        fresh_module: builds an unwrapped module shaped like the trained one (a GPT, with
            LoRA adapters when fine-tuning with LoRA); built on the meta device, so free.
        export: turns that module into the plain GPT stored as the model file
            (`components.finetune.merge_lora` for LoRA).
        extra_files: copied in as they are (the tokenizer).
    """
    model_state, optimizer_state = _full_state_dicts(model, optimizer)
    layout = tensor_parallel_layout(model)
    if layout is not None:  # c_attn's rows back in the usual q | k | v order: one file format for all
        tensor_parallel.reorder_qkv(layout, model_state, optimizer_state, to_saved=True)
    ranks = gather_from_ranks({"rng": _rng_state(), "data": data_position})
    if not _is_rank0():
        return
    os.makedirs(folder, exist_ok=True)
    with torch.device("meta"):
        module = fresh_module()
    module.load_state_dict(model_state, strict=True, assign=True)
    plain = export(module)
    plain.lm_head.weight = plain.transformer.wte.weight  # assign=True replaced the tied Parameter twice
    gpt.save_model(plain, folder)
    adapters = {k: v for k, v in model_state.items() if ADAPTER_MARK in k}
    torch.save({"step": step, "optimizer": optimizer_state, "ranks": ranks, "adapters": adapters},
               os.path.join(folder, TRAINER_STATE_FILE))
    for path in extra_files:
        shutil.copy(path, folder)
    write_manifest(folder, step)


def write_manifest(folder: str, step: int) -> None:
    """Record every file of `folder` with its size, and the step: the mark of a complete checkpoint."""
    files = {p.name: p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name != MANIFEST_FILE}
    write_json_atomic(os.path.join(folder, MANIFEST_FILE), {"step": step, "files": files})


def step_of(folder: str | Path) -> int | None:
    """The step of a complete checkpoint folder (local or on storage), or None when it is
    incomplete, unreadable or not a checkpoint."""
    location = str(folder)
    try:
        manifest = json.loads(storage.read_text(storage.join(location, MANIFEST_FILE)))
        sizes = storage.file_sizes(location)
        if any(sizes.get(name) != size for name, size in manifest["files"].items()):
            return None
        return int(manifest["step"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def newest(folders) -> tuple[str, int] | None:
    """(folder, step) of the complete checkpoint with the highest step among `folders`, or None."""
    best = None
    for folder in folders:
        step = step_of(folder) if folder else None
        if step is not None and (best is None or step > best[1]):
            best = (str(folder), step)
    return best


def find_under(root: str | Path) -> list[str]:
    """Every checkpoint folder below `root` (Ray Train's storage of one run, local or on
    storage), complete or not."""
    return [location.rpartition("/")[0] for location in storage.find_files(str(root), MANIFEST_FILE)]


def load_weights(folder: str, model: nn.Module) -> None:
    """Put a checkpoint's weights into the unwrapped `model` (before `parallelize`).

    A plain model gets the model file; a model with LoRA adapters keeps its frozen base
    (the weights it was fine-tuned from) and gets the adapters it had at the checkpoint.
    """
    state = _trainer_state(folder)
    if state["adapters"]:
        model.load_state_dict(state["adapters"], strict=False)
    else:
        safetensors.torch.load_model(model, os.path.join(folder, gpt.WEIGHTS_FILE), strict=True, device="cpu")


def restore(folder: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load the optimizer state into `optimizer` and this rank's RNG state; returns
    {"step", "data"} where `data` is this rank's data position at the checkpoint."""
    state = _trainer_state(folder)
    layout = tensor_parallel_layout(model)
    if layout is not None:  # the saved q | k | v order, as this split model holds c_attn
        tensor_parallel.reorder_qkv(layout, {}, state["optimizer"], to_saved=False)
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = state["ranks"][rank] if rank < len(state["ranks"]) else state["ranks"][0]
    if len(state["ranks"]) == (dist.get_world_size() if dist.is_initialized() else 1):
        _set_rng_state(mine["rng"])  # same worker count: each rank continues its own stream
    return {"step": state["step"], "data": mine["data"] if rank < len(state["ranks"]) else {"epoch": 0, "batch": 0}}


def _trainer_state(folder: str) -> dict:
    # weights_only: only tensors and plain containers are unpickled, never code.
    return torch.load(os.path.join(folder, TRAINER_STATE_FILE), map_location="cpu", weights_only=True)


def _full_state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on the CPU (on rank 0; a collective under FSDP)."""
    if dist.is_initialized():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        # Handles DDP's `module.` and torch.compile's `_orig_mod.` prefixes and FSDP2 shards alike.
        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Copies: on the CPU `.cpu()` would return the live tensors, and exporting (merging LoRA into the
    # base weights) would then change the model being trained.
    return ({k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()},
            optimizer.state_dict())


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

"""Tensor parallelism for the GPT: each block's Linear layers split over the ranks of a tp group.

torchtitan's plan for a decoder block, on PyTorch's `torch.distributed.tensor.parallel`:
the attention's q/k/v projection and the MLP's up-projection are split by output
columns (`ColwiseParallel`: each rank computes its slice of the features), the
attention's and the MLP's output projections by input rows (`RowwiseParallel`:
partial sums, all-reduced). Attention runs on each rank's own heads, so a block
costs two all-reduces forward and two backward. Embeddings, the tied lm_head and
the layer norms stay whole on every rank.

Two details of this model, without which a split model computes wrong results or does not run:
- `c_attn` is one Linear holding q, k and v ([q | k | v] rows). Split by columns
  as it is, rank 0 would get all of q and half of k, silently. Its rows are reordered once,
  when the model is split, to [q0 k0 v0 | q1 k1 v1 | ...] (qi: the rows of rank
  i's heads); checkpoints put them back in the usual order (`reorder_qkv`), so
  a model file is the same whatever wrote it.
- The attention module then computes with its local head count and width
  (`n_head / tp`, `n_embd / tp`), on plain local tensors: scaled_dot_product_attention
  has no DTensor sharding rule on the CPU.

Plain torch.distributed, no Ray; `components/parallel.py: parallelize` calls `apply`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

ATTRIBUTE = "_gptforge_tensor_parallel"  # where `apply` leaves the Layout on the model
QKV_KEYS = ("attn.c_attn.weight", "attn.c_attn.bias")


@dataclass(frozen=True)
class Layout:
    """How a model was split; kept on the model so the loop and checkpoints can ask."""

    mesh: object  # DeviceMesh of shape (dp, tp), dims named "dp" and "tp"
    n_embd: int  # the model's full width (c_attn has 3 * n_embd rows)
    grads_averaged_by_hand: bool  # pure tp with dp > 1: gradients all-reduced over "dp" after backward

    @property
    def tp_degree(self) -> int:
        return self.mesh["tp"].size()

    @property
    def dp_size(self) -> int:
        return self.mesh["dp"].size()


def qkv_rows(n_embd: int, tp: int) -> torch.Tensor:
    """The row order of `c_attn` under which a column split gives each rank its own heads' q, k and v.

    Returns:
        (3 * n_embd,) indices: reordered = weight[rows], i.e. [q0 k0 v0 | q1 k1 v1 | ...].
    """
    return torch.arange(3 * n_embd).view(3, tp, n_embd // tp).transpose(0, 1).reshape(-1)  # (3, tp, n/tp) -> (tp, 3, n/tp)


def apply(model: nn.Module, mesh, grads_averaged_by_hand: bool) -> None:
    """Split every block of the GPT `model` over `mesh["tp"]` (in place) and record the Layout."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp_mesh = mesh["tp"]
    tp = tp_mesh.size()
    n_embd = model.config.n_embd
    plan = {
        "attn.c_attn": ColwiseParallel(),  # (C -> 3C/tp): this rank's heads' q, k, v
        "attn.c_proj": RowwiseParallel(),  # (C/tp -> C), all-reduced
        "mlp.c_fc": ColwiseParallel(),  # (C -> 4C/tp)
        "mlp.c_proj": RowwiseParallel(),  # (4C/tp -> C), all-reduced
    }
    rows = qkv_rows(n_embd, tp)
    for block in model.transformer.h:
        with torch.no_grad():
            for p in block.attn.c_attn.parameters():
                p.copy_(p[rows.to(p.device)])
        parallelize_module(block, tp_mesh, plan)
        block.attn.n_head //= tp  # the attention now sees only this rank's heads
        block.attn.n_embd //= tp
    setattr(model, ATTRIBUTE, Layout(mesh, n_embd, grads_averaged_by_hand))


def reorder_qkv(layout: Layout, model_state: dict, optimizer_state: dict | None, to_saved: bool) -> None:
    """Put `c_attn`'s rows (weights and their optimizer moments) in the saved order or back (in place).

    Args:
        model_state, optimizer_state: full (unsharded) state dicts keyed by parameter name, as
            `torch.distributed.checkpoint.state_dict` gives and takes them.
        to_saved: True: split-model order -> the usual [q | k | v]; False: the other way.
    """
    rows = qkv_rows(layout.n_embd, layout.tp_degree)
    if to_saved:
        rows = torch.argsort(rows)
    for key, t in model_state.items():
        if key.endswith(QKV_KEYS) and isinstance(t, torch.Tensor):
            model_state[key] = t[rows.to(t.device)]
    for key, moments in (optimizer_state or {}).get("state", {}).items():
        if not (isinstance(key, str) and key.endswith(QKV_KEYS)):
            continue
        for name, t in moments.items():
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.size(0) == 3 * layout.n_embd:
                moments[name] = t[rows.to(t.device)]


def average_gradients(model: nn.Module, layout: Layout) -> None:
    """Average the gradients over the data-parallel replicas (pure tp with dp > 1; DDP's job elsewhere)."""
    group = layout.mesh["dp"].get_group()
    for p in model.parameters():
        if p.grad is None:
            continue
        local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        dist.all_reduce(local, group=group)  # gloo has no AVG: sum, then divide
        local.div_(layout.dp_size)


def share_batches(source: Iterable[dict] | None, layout: Layout, device: torch.device) -> Iterator[dict]:
    """Every rank of a tp group gets the same batches: its first rank's, broadcast to the others.

    The first rank of each tp group passes its data shard as `source`; the others pass None
    and receive. Each batch is {"tokens": (B, T+1)} plus "mask" when present; the end of
    `source` ends every member's iterator. Only a header (4 ints) and the rows travel.

    Args:
        device: where the broadcast tensors live (CPU for gloo, the GPU for nccl); batches
            come out on the CPU, as Ray Data gives them.
    """
    group = layout.mesh["tp"].get_group()
    leader = dist.get_global_rank(group, 0)
    if source is not None:
        for batch in source:
            tokens = torch.as_tensor(batch["tokens"], dtype=torch.long)  # (B, T+1)
            mask = batch.get("mask")
            header = torch.tensor([1, tokens.size(0), tokens.size(1), int(mask is not None)], device=device)
            dist.broadcast(header, leader, group=group)
            dist.broadcast(tokens.to(device), leader, group=group)
            if mask is not None:
                dist.broadcast(torch.as_tensor(mask, dtype=torch.long).to(device), leader, group=group)
            yield batch
        dist.broadcast(torch.zeros(4, dtype=torch.long, device=device), leader, group=group)  # the end
        return
    while True:
        header = torch.zeros(4, dtype=torch.long, device=device)
        dist.broadcast(header, leader, group=group)
        more, rows, width, has_mask = header.tolist()
        if not more:
            return
        batch = {"tokens": torch.empty(rows, width, dtype=torch.long, device=device)}
        dist.broadcast(batch["tokens"], leader, group=group)
        if has_mask:
            batch["mask"] = torch.empty(rows, width, dtype=torch.long, device=device)
            dist.broadcast(batch["mask"], leader, group=group)
        yield {k: v.cpu() for k, v in batch.items()}

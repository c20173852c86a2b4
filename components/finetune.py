"""Fine-tuning specifics: LoRA adapters on the project's own GPT.

A 20-line `LoRALinear` is used instead of `peft`: peft imports transformers and
accelerate (3-4 s in every Ray worker) and renames state-dict keys, while this
wrapper gives the same parameter count, speed and merge error (with either, the
merged model's outputs match the unmerged one's to about 2e-6). Checked again with peft
0.21: `get_peft_model` on this GPT gives the same adapter count, but its import (transformers,
accelerate, torchao) took 10 s, and every key gains a `base_model.model.` prefix that
checkpoints and merging would have to undo. A Hugging Face GPT-2
changes nothing here: it is converted to this GPT first (its Conv1D weights become
nn.Linear ones), so the same four targets and the same checkpoints serve every base.
After training, `merge_lora` folds the adapters back into plain `nn.Linear`
weights, so the fine-tuned model is an ordinary GPT for quantization and serving.
"""
from __future__ import annotations

import math

import torch
from torch import nn

# The Linear layers inside each transformer block; names follow GPT-2's.
LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T, with the base layer frozen.

    B starts at zero, so the wrapped model starts out identical to the base.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))  # (r, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> nn.Linear:
        """The base Linear with the low-rank update added to its weight."""
        with torch.no_grad():
            self.base.weight += (self.lora_b @ self.lora_a) * self.scale  # (out, in)
        return self.base


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...] = LORA_TARGETS) -> nn.Module:
    """Freeze `model` and wrap each targeted Linear of every block with a LoRA adapter (in place).

    Returns:
        The same model, whose only trainable parameters are the adapters.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.transformer.h:
        for path in targets:
            parent_name, child_name = path.split(".")
            parent = getattr(block, parent_name)
            setattr(parent, child_name, LoRALinear(getattr(parent, child_name), rank, alpha))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its merged Linear (in place) and make all weights trainable again."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> dict[str, float]:
    """What fine-tuning trains, as the fine-tune run's params: trainable and total parameters, their
    ratio, and with adapters the adapter parameters per target module (summed over the blocks).

    Each tensor counts once (the tied embedding and head are one tensor).
    """
    tensors = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in tensors)
    trainable = sum(p.numel() for p in tensors if p.requires_grad)
    out = {"finetune.total_params": total, "finetune.trainable_params": trainable,
           "finetune.trainable_ratio": trainable / total if total else 0.0}
    for block in getattr(getattr(model, "transformer", None), "h", ()):
        for path in LORA_TARGETS:
            layer = block.get_submodule(path)
            if isinstance(layer, LoRALinear):
                key = f"lora.adapter_params.{path}"
                out[key] = out.get(key, 0) + layer.lora_a.numel() + layer.lora_b.numel()
    return out

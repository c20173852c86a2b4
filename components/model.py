"""A GPT-2 style language model in one file, after karpathy/nanoGPT `model.py`.

Module names match the Hugging Face GPT-2 checkpoint keys (`transformer.h.0.attn.c_attn`
and so on), so GPT-2 weights map across without a translation table (HF stores the
Linear weights as Conv1D, i.e. transposed). Weights are stored as safetensors plus a
`config.json`; nothing here pickles. Decoding lives beside it: the KV cache in
components/kv_cache.py, the samplers in components/generation.py.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
import safetensors.torch
import torch
import torch.nn as nn
from torch.nn import functional as F

from components.files import atomic_write, write_json_atomic
from components.kv_cache import KVCache

IGNORE_INDEX = -100  # targets with this value carry no loss (prompt tokens, padding)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT model. Validated on construction."""

    block_size: int = 128
    """Longest context the model sees, in tokens (size of the position embedding)."""
    vocab_size: int = 4096
    """Tokenizer vocabulary size (rows of the token embedding and of the lm_head)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide `n_embd`."""
    n_embd: int = 128
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches (0 for pretraining)."""
    bias: bool = True
    """Biases in Linear and LayerNorm layers, as in GPT-2. False is a bit better and faster."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive int, got {value!r}")
        if not problems and self.n_embd % self.n_head != 0:
            problems.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if problems:
            raise ValueError("invalid GPTConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        """Plain dict of the fields, for `config.json`."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        """Build from a dict, ignoring keys that are not fields (e.g. "quantization")."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
    "mini": dict(n_layer=6, n_head=6, n_embd=384),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M with vocab 50257, block 1024
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def config_from_preset(preset: str, **overrides) -> GPTConfig:
    """Config of a named preset with some fields replaced.

    Args:
        preset: a key of `PRESETS`.
        **overrides: GPTConfig fields to replace; a value of None means "keep the preset's".

    Raises:
        ValueError: unknown preset or unknown override key (the message lists the valid ones),
            or an invalid resulting config.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; known presets: {', '.join(PRESETS)}")
    names = [f.name for f in fields(GPTConfig)]
    unknown = sorted(k for k in overrides if k not in names)
    if unknown:
        raise ValueError(f"unknown GPTConfig key(s) {unknown}; valid keys: {', '.join(names)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return GPTConfig(**values)


# ----------------------------------------------------------------------------- modules


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no `bias=False` before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        # key, query, value projections for all heads, in one batched Linear
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer = layer  # index into a KVCache

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.size()  # batch, sequence length, n_embd
        # Under tensor parallelism `c_attn` yields only this rank's heads and `n_head`, `n_embd`
        # are this rank's share (components/tensor_parallel.py); on one process they are the whole.
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, n_embd)
        hs = self.n_embd // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if hasattr(cache, "attend"):  # a SlotCache: the tokens of many rows packed into one sequence
            y = cache.attend(self.layer, q, k, v).transpose(1, 2).reshape(B, T, self.n_embd)
            return self.resid_dropout(self.c_proj(y))
        mask, causal = None, True
        if cache is not None:
            past = cache.length
            if cache.pad is not None:
                mask, causal = cache.padding_mask(T), False  # (B, 1, T, past + T)
            k, v = cache.update(self.layer, k, v)  # (B, nh, past + T, hs)
            if cache.pad is not None:
                pass  # the padding mask above already holds the causal part
            elif past and T == 1:
                causal = False  # one new query may see every cached key
            elif past:
                # query i sits at position past + i and may see keys 0 .. past + i
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)  # (T, past+T)
                causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=causal
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_embd)  # (B, T, n_embd): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config, layer) for layer in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (https://paperswithcode.com/method/weight-tying): one Parameter object
        # under two names. save_model/load_model and components/accounting.py rely on it being shared.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2 paper: scale the init of the projections into the residual stream by
        # 1/sqrt(2 * n_layer), since each block adds two of them to the stream.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for every position, and the mean next-token loss when targets are given.

        Args:
            idx: (B, T) long token ids, T <= block_size.
            targets: (B, T) long ids of the next token; IGNORE_INDEX marks positions the loss skips
                (padding, prompt tokens in finetuning).
            cache: keys and values of earlier positions (`new_cache`); `idx` continues them,
                at positions cache.length .. cache.length + T - 1, and the cache grows by T.
            logits_at: (n,) long indices into T: only those positions' logits are computed (decoding
                needs the next token's, not a whole prompt's; the vocabulary projection is the largest
                matmul of a small model's step). Not with targets.

        Returns:
            logits (B, T, vocab_size) in the model's dtype, or (B, n, vocab_size) with `logits_at`, and
            the loss (float32 scalar) or None.
        """
        B, T = idx.size()
        start = cache.length if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} is longer than block_size {self.config.block_size}")
        if cache is not None:
            pos = cache.positions(T)  # (T,), or (B, T) with left padding
        else:
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C) broadcast over the batch, or (B, T, C)
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.advance(T)
        if logits_at is not None:
            if targets is not None:
                raise ValueError("logits_at leaves out positions the loss needs; pass one or the other")
            x = x.index_select(1, logits_at)  # (B, n, C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T or n, vocab_size)
        loss = None
        if targets is not None:
            # float32 so that bf16/fp16 runs get a stable softmax and a comparable loss value
            loss = F.cross_entropy(
                logits.float().view(-1, logits.size(-1)),  # (B*T, vocab_size)
                targets.view(-1),  # (B*T,)
                ignore_index=IGNORE_INDEX,
            )
        return logits, loss

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  pad: torch.Tensor | None = None) -> KVCache:
        """An empty KVCache for `batch_size` rows, on the model's device, in its activation dtype.

        `pad` (B,): left-padding positions per row, for prompts of different lengths in one batch.
        """
        ref = self.transformer.wpe.weight  # never quantized: its dtype is the activations' dtype
        return KVCache(self.config, batch_size, device or ref.device, ref.dtype, pad)


# ----------------------------------------------------------------------------- storage


def save_model(model: GPT, folder: str) -> None:
    """Write `folder/model.safetensors` and `folder/config.json` (folder created if missing).

    Each file goes to a temporary name first and is then renamed, so a reader never sees a
    half-written file. The tied lm_head weight is stored once (safetensors drops the alias).
    """
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, WEIGHTS_FILE)
    atomic_write(weights, lambda tmp: safetensors.torch.save_model(model, str(tmp)))
    write_json_atomic(os.path.join(folder, CONFIG_FILE), model.config.to_dict())


def read_config(folder: str) -> GPTConfig:
    """The GPTConfig of a model folder written by `save_model` (local or on storage)."""
    from components import storage

    return GPTConfig.from_dict(json.loads(storage.read_bytes(storage.join(folder, CONFIG_FILE))))


def load_model(folder: str, map_location: str = "cpu") -> GPT:
    """Inverse of `save_model`; returns the model on `map_location`, in eval mode.

    A folder written by quantize_model in bf16/fp16 loads too (upcast to float32).

    Raises:
        FileNotFoundError: config.json or model.safetensors is missing.
        ValueError: the folder holds an int8 model (use `components.quantize.load_variant`).
    """
    config_path = os.path.join(folder, CONFIG_FILE)
    weights = os.path.join(folder, WEIGHTS_FILE)
    for path in (config_path, weights):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; is {folder!r} a model folder written by save_model?")
    with open(config_path) as f:
        raw = json.load(f)
    if raw.get("quantization", "fp32") not in ("fp32", "bf16", "fp16"):
        raise ValueError(
            f"{folder!r} holds a {raw['quantization']!r} model; load it with components.quantize.load_variant"
        )
    model = GPT(GPTConfig.from_dict(raw))
    safetensors.torch.load_model(model, weights, strict=True, device="cpu")
    return model.to(map_location).eval()


# ----------------------------------------------------------------------------- training cost


def flops_per_token(cfg: GPTConfig, n_params_non_embedding: int | None = None) -> int:
    """Training FLOPs per token (forward + backward), PaLM paper (Chowdhery et al. 2022), appendix B.

    6 * N + 12 * n_layer * n_embd * block_size, where N is the non-embedding parameter count
    and the second term is the attention score/value matmuls at full context length.

    Args:
        cfg: model shape.
        n_params_non_embedding: N; computed from `cfg` when None (equal to
            `components.accounting.parameter_counts(GPT(cfg))["non_embedding"]`).
    """
    if n_params_non_embedding is None:
        C, b = cfg.n_embd, int(cfg.bias)
        per_layer = (
            2 * (C + b * C)  # ln_1, ln_2
            + 3 * C * C + b * 3 * C  # attn.c_attn
            + C * C + b * C  # attn.c_proj
            + 4 * C * C + b * 4 * C  # mlp.c_fc
            + 4 * C * C + b * C  # mlp.c_proj
        )
        n_params_non_embedding = cfg.n_layer * per_layer + (C + b * C)  # + ln_f
    return 6 * n_params_non_embedding + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

"""Hugging Face GPT-2 checkpoints in and out of gptforge model folders.

components/model.py names its modules after GPT-2's keys, so a weight keeps its name across
(`transformer.h.0.attn.c_attn.weight` on both sides). What does change:
- HF GPT-2 computes its projections with Conv1D, whose weight is the transpose of nn.Linear's.
- gptforge may pad the vocabulary (`model.pad_vocab_to`): padding rows are dropped on export and,
  on import, added with the mean of the real rows (see `_pad_rows`).
- gptforge `bias=False` models have no biases; GPT-2 always has them. Export writes zero biases,
  which compute exactly the same function (a missing bias is a zero bias).
- Each folder keeps its own tokenizer: `<|endoftext|>` is id 0 in gptforge's tokenizers and 50256
  in GPT-2's, and the ids the weights were trained on are the tokenizer's, so neither is remapped.
- GPT-2 uses the tanh approximation of GELU (`gelu_new`); gptforge's MLP computes the exact GELU.
  The two differ by at most 5e-4 per activation, so an imported GPT-2 gives logits close to, not
  bit-equal to, Hugging Face's. Export writes `activation_function: gelu`, which is exact.

Nothing here imports transformers: the folders are plain files (safetensors, JSON, tokenizer.json).
"""
from __future__ import annotations

import functools
import math
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import safetensors.torch
import torch
from tokenizers import Tokenizer

from components.chat import ChatError, parse_chat_template, save_chat_template
from components.hf_files import ConversionError, parse_json, read_bytes, read_json, read_tokenizer, read_weights
from components.files import CHECKSUMS_FILE, read_verified, write_checksums, write_json_atomic
from components.model import CONFIG_FILE, GPT, WEIGHTS_FILE, GPTConfig, save_model
from components.tokenizer import EOT, TOKENIZER_FILE

HF_TOKENIZER_CONFIG = "tokenizer_config.json"
LAYER_NORM_EPS = 1e-5  # components/model.py LayerNorm's epsilon, and GPT-2's
EXACT_GELU, TANH_GELUS = "gelu", ("gelu_new", "gelu_pytorch_tanh")
# Conv1D weights: (in, out) in HF, (out, in) in nn.Linear.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers older GPT-2 checkpoints store; not weights.
_MASK_BUFFER = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")
_WTE, _HEAD = "transformer.wte.weight", "lm_head.weight"
_MAX_LISTED = 8  # problems listed in one message before "... and N more"


@dataclass(frozen=True)
class Imported:
    """What `import_hf` wrote."""

    config: GPTConfig
    """The gptforge model's shape (vocab_size includes any padding rows)."""
    tokens: int
    """Tokens of the tokenizer (the rows that are not padding)."""
    eot_id: int | None
    """Id of `<|endoftext|>` in the folder's tokenizer (50256 for GPT-2's), None when it has none."""
    tanh_gelu: bool
    """The checkpoint was trained with the tanh GELU, which gptforge computes exactly (see the module doc)."""
    checksums_sha256: str
    """sha256 of the checksums.json written."""


@dataclass(frozen=True)
class Exported:
    """What `export_hf` wrote."""

    config: GPTConfig
    """The gptforge model's shape."""
    tokens: int
    """HF vocab_size: the tokenizer's tokens (padding rows dropped)."""
    eot_id: int | None
    """Id of `<|endoftext|>` in the tokenizer (0 for gptforge's), written as bos/eos_token_id."""
    zero_biases: bool
    """The model has no biases (bias=False) and zero biases were written in their place."""


# ----------------------------------------------------------------------------- configs


def gpt_config_from_hf(hf: dict, where: str, pad_vocab_to: int = 1) -> tuple[GPTConfig, int]:
    """The gptforge shape of an HF GPT-2 config.json, and the checkpoint's vocab_size.

    Every setting gptforge's model cannot reproduce is refused, all of them in one message.

    Args:
        hf: the parsed config.json.
        where: its path, for messages.
        pad_vocab_to: round the vocabulary up to a multiple of this (as `model.pad_vocab_to`).

    Raises:
        ConversionError: naming each config key that does not fit.
    """
    from components.config import ModelConfig

    problems = []

    def expect(key, default, ok, wanted):
        if not ok(hf.get(key, default)):
            problems.append(f"{key}={hf.get(key, default)!r} (gptforge needs {wanted})")

    expect("model_type", "gpt2", lambda v: v == "gpt2", "'gpt2'")
    expect("activation_function", "gelu_new", lambda v: v in (EXACT_GELU, *TANH_GELUS),
           f"one of {', '.join((EXACT_GELU, *TANH_GELUS))}")
    expect("layer_norm_epsilon", LAYER_NORM_EPS, lambda v: isinstance(v, (int, float)) and math.isclose(
        v, LAYER_NORM_EPS, rel_tol=1e-6), str(LAYER_NORM_EPS))
    expect("n_inner", None, lambda v: v is None or v == 4 * hf.get("n_embd", 768), "null or 4 * n_embd")
    expect("scale_attn_weights", True, lambda v: v is True, "true")
    expect("scale_attn_by_inverse_layer_idx", False, lambda v: v is False, "false")
    expect("add_cross_attention", False, lambda v: v is False, "false")
    if problems:
        raise ConversionError(f"{where}: not a GPT-2 gptforge can run: {'; '.join(problems)}")
    if not isinstance(pad_vocab_to, int) or pad_vocab_to < 1:
        raise ConversionError(f"pad_vocab_to must be a positive int, got {pad_vocab_to!r}")
    hf_vocab = hf.get("vocab_size", 50257)
    try:
        # Dropout is a training setting and leaves the logits alone: the import keeps gptforge's default (none).
        config = GPTConfig(block_size=hf.get("n_positions", 1024), n_layer=hf.get("n_layer", 12),
                           n_head=hf.get("n_head", 12), n_embd=hf.get("n_embd", 768), bias=True,
                           vocab_size=ModelConfig(pad_vocab_to=pad_vocab_to).padded_vocab(hf_vocab)
                           if isinstance(hf_vocab, int) else hf_vocab)
    except (TypeError, ValueError) as error:
        raise ConversionError(f"{where}: {error} (n_positions is block_size)") from None
    return config, hf_vocab


def hf_config(config: GPTConfig, tokens: int, eot_id: int | None) -> dict:
    """The HF GPT2Config (config.json) of a gptforge model whose tokenizer has `tokens` tokens."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": tokens, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": EXACT_GELU,  # what gptforge's nn.GELU() computes
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "bos_token_id": eot_id, "eos_token_id": eot_id,
    }


# ----------------------------------------------------------------------------- state dicts


def gpt_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict of `GPT(config)`, computed on the meta device (nothing allocated)."""
    return dict(_gpt_shapes(config))


@functools.lru_cache(maxsize=8)  # building even a meta GPT-2 XL takes a while, and a conversion asks twice
def _gpt_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}


def hf_shapes(config: GPTConfig, hf_vocab: int) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an HF GPT-2 checkpoint of this shape (Conv1D transposed, biases, tied head left out)."""
    shapes = gpt_shapes(replace(config, bias=True, vocab_size=hf_vocab))
    del shapes[_HEAD]
    return {k: s[::-1] if k.endswith(_CONV1D) else s for k, s in shapes.items()}


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig, hf_vocab: int,
                       where: str) -> dict[str, torch.Tensor]:
    """The state dict of `GPT(config)` from an HF GPT-2 one (keys with or without `transformer.`).

    Raises:
        ConversionError: a key missing, unexpected or of another shape (each named), or an lm_head
            that is not the token embedding (gptforge ties them).
    """
    bare = not any(k.startswith("transformer.") for k in hf)  # GPT2Model checkpoints (the original gpt2)
    sd = {("transformer." + k if bare and k != _HEAD else k): v for k, v in hf.items() if not _MASK_BUFFER.search(k)}
    head = sd.pop(_HEAD, None)
    _check_shapes(sd, hf_shapes(config, hf_vocab), where)
    wte = sd[_WTE]
    if head is not None and head is not wte and not head.is_meta and not torch.equal(head, wte):
        raise ConversionError(f"{where}: {_HEAD} differs from {_WTE}; gptforge ties the output head to the "
                              f"token embedding, so an untied GPT-2 cannot be imported")
    out = {k: (v.t() if k.endswith(_CONV1D) else v).to(torch.float32).contiguous() for k, v in sd.items()}
    out[_WTE] = _pad_rows(out[_WTE], config.vocab_size)
    out[_HEAD] = out[_WTE]
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], config: GPTConfig, tokens: int,
                     where: str) -> tuple[dict[str, torch.Tensor], bool]:
    """An HF GPT-2 state dict (tied head left out, as save_pretrained writes it) from a gptforge one.

    Args:
        sd: the weights of `GPT(config)`; the tied embedding under either name or both.
        tokens: the tokenizer's tokens: rows from there on are padding and are dropped.

    Returns:
        The state dict, and whether zero biases were written for a bias=False model.

    Raises:
        ConversionError: a key missing, unexpected or of another shape (each named), or fewer
            embedding rows than the tokenizer has tokens.
    """
    sd = dict(sd)
    sd.setdefault(_WTE, sd.get(_HEAD))
    sd.setdefault(_HEAD, sd[_WTE])
    if sd[_WTE] is None:
        raise ConversionError(f"{where}: missing {_HEAD} (the token embedding)")
    _check_shapes(sd, gpt_shapes(config), where)
    if tokens > config.vocab_size:
        raise ConversionError(f"{where}: the tokenizer has {tokens} tokens but the model only "
                              f"{config.vocab_size} embedding rows ({_WTE})")
    del sd[_HEAD]
    out = {k: (v.t() if k.endswith(_CONV1D) else v).to(torch.float32).contiguous() for k, v in sd.items()}
    out[_WTE] = out[_WTE][:tokens].contiguous()
    for key, shape in hf_shapes(config, tokens).items():
        if key not in out:  # a bias of a bias=False model: zero is what it computed
            out[key] = torch.zeros(shape, dtype=torch.float32, device=out[_WTE].device)
    return out, not config.bias


def _pad_rows(wte: torch.Tensor, rows: int) -> torch.Tensor:
    """`wte` with rows added up to `rows`, each the mean of the real ones. The logit of such a row is the
    mean of the real logits, so (Jensen) its probability is at most 1/V; a zero row would give logit 0,
    far above GPT-2's usual logits."""
    if rows == wte.shape[0]:
        return wte
    return torch.cat([wte, wte.mean(dim=0, keepdim=True).expand(rows - wte.shape[0], -1)])


def _check_shapes(sd: dict, expected: dict[str, tuple[int, ...]], where: str) -> None:
    problems = [f"missing {k} (expected shape {tuple(s)})" for k, s in expected.items() if k not in sd]
    problems += [f"unexpected key {k}" for k in sd if k not in expected]
    problems += [f"{k} has shape {tuple(sd[k].shape)}, expected {tuple(s)}" for k, s in expected.items()
                 if k in sd and tuple(sd[k].shape) != tuple(s)]
    if problems:
        more = f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ConversionError(f"{where}: the weights do not match {CONFIG_FILE}: "
                              f"{'; '.join(problems[:_MAX_LISTED])}{more}")


# ----------------------------------------------------------------------------- folders


def import_hf(src: str | Path, out: str | Path, pad_vocab_to: int = 1) -> Imported:
    """Convert a local HF GPT-2 folder into a gptforge model folder with checksums.json.

    `src` holds config.json, weights (model.safetensors, a sharded model.safetensors.index.json, or
    pytorch_model.bin, read with weights_only) and a tokenizer (tokenizer.json, or vocab.json +
    merges.txt). `out` must not exist yet (or be empty); it appears complete or not at all.

    Raises:
        ConversionError: naming the file (and key) that is missing, unreadable or does not fit.
    """
    src = Path(src)
    hf_cfg = read_json(src / CONFIG_FILE)
    where = str(src / CONFIG_FILE)
    activation = hf_cfg.get("activation_function", "gelu_new")
    config, hf_vocab = gpt_config_from_hf(hf_cfg, where, pad_vocab_to)
    tokenizer, tokenizer_file = read_tokenizer(src)
    config_file = src / HF_TOKENIZER_CONFIG
    template = _chat_template(read_bytes(config_file, "") if config_file.exists() else None, config_file)
    tokens = _tokens(tokenizer)
    if tokens > hf_vocab:
        raise ConversionError(f"{tokenizer_file}: has ids up to {tokens - 1} but {where} says vocab_size={hf_vocab}")
    weights, weights_file = read_weights(src)
    sd = from_hf_state_dict(weights, config, hf_vocab, weights_file)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True gave the two names two Parameters

    def write(folder: Path) -> str:
        save_model(model, str(folder))
        tokenizer.save(str(folder / TOKENIZER_FILE))
        if template is not None:  # the HF folder's chat template, where transformers keeps it
            save_chat_template(str(folder), template)
        return write_checksums(folder)

    pin = _write_folder(Path(out), write)
    return Imported(config, tokens, tokenizer.token_to_id(EOT), activation in TANH_GELUS, pin)


def export_hf(folder: str | Path, out: str | Path, checksums_sha256: str | None = None) -> Exported:
    """Write a folder that transformers' GPT2LMHeadModel and AutoTokenizer load from a gptforge model folder.

    A folder with checksums.json (a candidate) is checked first, against `checksums_sha256` when
    given (the registry's pin), and converted from the very bytes checked. `out` must not exist yet
    (or be empty); it appears complete or not at all.

    Raises:
        ConversionError: a file missing or not a float model, or weights that do not fit config.json.
        IntegrityError: the files do not match checksums.json (or the pin).
    """
    from components.quantize import CANDIDATE_FILES, candidate_files

    folder = Path(folder)
    # tokenizer_config.json (the chat template) is optional: folders written before candidates had one, and
    # fine-tuned models without a chat format, lack it.
    names = candidate_files(folder)
    if checksums_sha256 is not None or (folder / CHECKSUMS_FILE).exists():
        files = read_verified(folder, names, checksums_sha256)
    else:
        hint = f"; a gptforge model folder holds {', '.join(n for n in CANDIDATE_FILES if n != HF_TOKENIZER_CONFIG)}"
        files = {name: read_bytes(folder / name, hint) for name in names}
    raw = parse_json(files[CONFIG_FILE], folder / CONFIG_FILE)
    if raw.get("quantization", "fp32") not in ("fp32", "bf16", "fp16"):
        raise ConversionError(f"{folder / CONFIG_FILE}: holds a {raw['quantization']!r} model; export a float "
                              f"one (fp32, bf16 or fp16)")
    try:
        config = GPTConfig.from_dict(raw)
        tokenizer = Tokenizer.from_str(files[TOKENIZER_FILE].decode())
        sd = safetensors.torch.load(files[WEIGHTS_FILE])
    except Exception as error:  # noqa: BLE001 - tokenizers and safetensors raise plain exceptions
        raise ConversionError(f"{folder}: not a gptforge model folder ({error})") from None
    tokens, eot_id = _tokens(tokenizer), tokenizer.token_to_id(EOT)
    template = _chat_template(files.get(HF_TOKENIZER_CONFIG), folder / HF_TOKENIZER_CONFIG)
    hf_sd, zero_biases = to_hf_state_dict(sd, config, tokens, str(folder / WEIGHTS_FILE))

    def write(target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        safetensors.torch.save_file(hf_sd, str(target / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json_atomic(target / CONFIG_FILE, hf_config(config, tokens, eot_id))
        (target / TOKENIZER_FILE).write_bytes(files[TOKENIZER_FILE])
        special = {f"{k}_token": EOT for k in ("bos", "eos", "unk")} if eot_id is not None else {}
        write_json_atomic(target / HF_TOKENIZER_CONFIG, {
            "tokenizer_class": "GPT2Tokenizer", "model_max_length": config.block_size,
            "add_prefix_space": False, "add_bos_token": False, **special,
            **({"chat_template": template} if template is not None else {})})

    _write_folder(Path(out), write)
    return Exported(config, tokens, eot_id, zero_biases)


def _write_folder(out: Path, write):
    """Run `write(staging)` on a folder beside `out`, then rename it to `out`: a reader sees all or nothing."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        result = write(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def _chat_template(config: bytes | None, where: Path) -> str | None:
    """The chat template of a tokenizer_config.json's bytes (None without the file or the key)."""
    try:
        return parse_chat_template(config, str(where)) if config is not None else None
    except ChatError as error:
        raise ConversionError(str(error)) from None


def _tokens(tokenizer: Tokenizer) -> int:
    """Rows the tokenizer's ids need: its largest id + 1."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1

"""Reading a Hugging Face GPT-2 folder's files: weights (safetensors, sharded or a weights-only
pickle), tokenizer (tokenizer.json or vocab.json + merges.txt) and JSON, each failure a
`ConversionError` naming the file. The conversion itself is components/hf_gpt2.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from components.documents import DataError
from components.model import WEIGHTS_FILE
from components.tokenizer import EOT, TOKENIZER_FILE

HF_SHARD_INDEX = "model.safetensors.index.json"
HF_PICKLE_WEIGHTS = "pytorch_model.bin"
HF_VOCAB, HF_MERGES = "vocab.json", "merges.txt"


class ConversionError(DataError):
    """A folder or checkpoint that cannot be converted; the message names the file and the key."""


def read_weights(src: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's tensors and the file they came from; never unpickles anything but tensors."""
    single, index = src / WEIGHTS_FILE, src / HF_SHARD_INDEX
    try:
        if single.exists():
            return safetensors.torch.load_file(str(single)), str(single)
        if index.exists():
            shards = read_json(index).get("weight_map", {})
            names = sorted(set(shards.values()))
            bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
            if bad or not names:
                raise ConversionError(f"{index}: weight_map must name shard files inside the folder, got {bad or names}")
            weights = {}
            for name in names:
                weights.update(safetensors.torch.load_file(str(src / name)))
            return weights, str(index)
        pickled = src / HF_PICKLE_WEIGHTS
        if pickled.exists():
            return torch.load(pickled, map_location="cpu", weights_only=True), str(pickled)
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors and the weights-only unpickler raise many kinds
        raise ConversionError(f"{src}: cannot read the weights ({type(error).__name__}: {error})") from None
    raise ConversionError(f"{src}: no weights: expected {WEIGHTS_FILE}, {HF_SHARD_INDEX} or {HF_PICKLE_WEIGHTS}")


def read_tokenizer(src: Path) -> tuple[Tokenizer, str]:
    """The folder's tokenizer (tokenizer.json, else GPT-2's byte-level BPE from vocab.json + merges.txt)."""
    path = src / TOKENIZER_FILE
    try:
        if path.exists():
            return Tokenizer.from_file(str(path)), str(path)
        vocab, merges = src / HF_VOCAB, src / HF_MERGES
        if not (vocab.exists() and merges.exists()):
            raise ConversionError(f"{src}: no tokenizer: expected {TOKENIZER_FILE}, or {HF_VOCAB} and {HF_MERGES}")
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        if tokenizer.token_to_id(EOT) is not None:  # keeps its id; marked special so it is never split
            tokenizer.add_special_tokens([AddedToken(EOT, special=True)])
        return tokenizer, str(vocab)
    except ConversionError:
        raise
    except Exception as error:  # noqa: BLE001 - tokenizers raises a plain Exception
        raise ConversionError(f"{src}: cannot read the tokenizer ({error})") from None


def read_bytes(path: Path, hint: str = "") -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConversionError(f"{path}: cannot be read ({error.strerror}){hint}") from None


def read_json(path: Path) -> dict:
    return parse_json(read_bytes(path, "; is this a Hugging Face GPT-2 folder?"), path)


def parse_json(data: bytes, path: Path) -> dict:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return value

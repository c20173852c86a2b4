"""The model fine-tuning starts from (`finetune.init_from`): what the value may be, the rules it
brings to the rest of the experiment, and the copy of it that the stages read.

`init_from` is unset (the pretrain stage's output), a gptforge model folder, a Hugging Face GPT-2
folder, or a registry reference `models:/NAME@ALIAS` / `models:/NAME/VERSION` (the registry side
is `pipelines/init_from.py`). Every starting model becomes one folder below the storage root,
`bases/<kind>-<hash>/` (model.safetensors, config.json, tokenizer.json, checksums.json), named
after the content it came from: the same starting model gives the same folder in every run, so
the data stage and fine-tuning caches see the same inputs, and a Hugging Face folder is converted
once. The folder's checksums.json is what the workers check their copy against.

With a starting model, the data stage tokenizes with its tokenizer (whatever id its
`<|endoftext|>` has; the manifest records it) and the model's shape is the starting model's.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from pathlib import Path

from components import storage
from components.files import CHECKSUMS_FILE, IntegrityError, verify_checksums, write_checksums
from components.hf_files import ConversionError
from components.model import CONFIG_FILE, WEIGHTS_FILE, GPTConfig
from components.tokenizer import TOKENIZER_FILE

REGISTRY_PREFIX = "models:/"
_REGISTRY_REF = re.compile(r"models:/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))")
BASE_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)  # a gptforge model folder, besides checksums.json
FLOAT_MODELS = ("fp32", "bf16", "fp16")  # the stored variants training can start from (not int8/int4)
BASES_FOLDER = "bases"  # below the storage root
_SHAPE_KEYS = ("n_layer", "n_head", "n_embd")
_CHUNK = 8 << 20


# ----------------------------------------------------------------------------- the setting


def registry_ref(value: str) -> tuple[str, str | None, str | None] | None:
    """(name, alias, version) of `models:/NAME@ALIAS` or `models:/NAME/VERSION`; None for anything else."""
    match = _REGISTRY_REF.fullmatch(value)
    return (match["name"], match["alias"], match["version"]) if match else None


def init_from_problem(value: str) -> str | None:
    """The field rule of `finetune.init_from`: a `models:/` value must be a whole registry reference."""
    if value.startswith(REGISTRY_PREFIX) and registry_ref(value) is None:
        return (f"{value!r} is not a registry reference; use models:/NAME/VERSION, or models:/NAME "
                f"followed by @ALIAS (e.g. @champion)")
    return None


def config_problems(cfg) -> list[str]:
    """The checks across sections that `init_from` and `pretrain.enabled` bring (ExperimentConfig `cfg`)."""
    init_from = cfg.finetune.init_from
    if not init_from:
        if not cfg.pretrain.enabled:
            return ["pretrain.enabled: false needs finetune.init_from (the model to fine-tune instead of the "
                    "pretrained one): a gptforge or Hugging Face GPT-2 folder, or models:/NAME@ALIAS"]
        return []
    problems = []
    if cfg.pretrain.enabled:
        problems.append(f"pretrain.enabled: true, but finetune.init_from={init_from!r} starts fine-tuning from "
                        f"another model, so the pretrained one would not be used; set pretrain.enabled: false")
    if cfg.tokenizer.file is not None:
        problems.append(f"tokenizer.file: the data stage uses the tokenizer of finetune.init_from={init_from!r} "
                        f"(the ids its weights were trained on); leave tokenizer.file unset")
    return problems


def model_problems(cfg, base: GPTConfig, where: str) -> list[str]:
    """What in `cfg` disagrees with the starting model `base` (read from `where`).

    The shape comes from the starting model: `model.preset` and `tokenizer.vocab_size` are
    ignored, an explicit `model.n_layer/n_head/n_embd` must be the model's, `model.bias: false`
    cannot drop the biases a model was trained with, and rows longer than its context cannot fit.
    """
    m = cfg.model
    problems = [f"model.{key}={getattr(m, key)} differs from the starting model's {getattr(base, key)} ({where}); "
                f"the shape comes from finetune.init_from, so remove model.{key}"
                for key in _SHAPE_KEYS if getattr(m, key) is not None and getattr(m, key) != getattr(base, key)]
    if not m.bias and base.bias:
        problems.append(f"model.bias=false, but the starting model has biases ({where}); remove model.bias")
    if cfg.data.block_size > base.block_size:
        problems.append(f"data.block_size={cfg.data.block_size} is longer than the starting model's context "
                        f"({base.block_size} positions, {where}); lower data.block_size")
    return problems


# ----------------------------------------------------------------------------- the folder the stages read


def is_hf_folder(location: str) -> bool:
    """Whether the model folder `location` is a Hugging Face one (its config.json is a GPT2Config).

    Raises:
        ConversionError: there is no readable config.json.
    """
    raw = _config_json(location)
    return "model_type" in raw or "n_positions" in raw


def base_folder(root: str, kind: str, content_sha256: str) -> str:
    """Where the starting model of `kind` whose source hashes to `content_sha256` is kept under `root`."""
    return storage.join(root, BASES_FOLDER, f"{kind}-{content_sha256[:24]}")


def folder_sha256(location: str, names: tuple[str, ...] | None = None) -> str:
    """sha256 over the files of a folder (path or storage URI): `names`, else every file in it.

    Each file is hashed on its own, then the sorted (name, sha256) list: the same files give the
    same hash wherever the folder lives.
    """
    if names is None:
        names = tuple(sorted(storage.file_sizes(location)))
    sums = {name: _file_sha256(storage.join(location, name)) for name in sorted(names)}
    return hashlib.sha256(json.dumps(sums, sort_keys=True).encode()).hexdigest()


def ready_pin(target: str, pin: str | None = None) -> str | None:
    """sha256 of `target`'s checksums.json when the folder is complete (checked against `pin` when
    given); None when it is missing or fails the check, so that it is written again."""
    if not storage.is_file(storage.join(target, CHECKSUMS_FILE)):
        return None
    try:
        verify_folder(storage.local_copy(target, checksums_sha256=pin), pin)  # local_copy checks a remote copy only
    except (IntegrityError, OSError, ValueError):
        return None
    return _file_sha256(storage.join(target, CHECKSUMS_FILE))


def verify_folder(folder: str | Path, pin: str | None = None) -> None:
    """Check a local model folder against its checksums.json (and `pin`): every file it lists, which
    must include BASE_FILES (a registered version may hold more, such as a chat template).

    Raises:
        IntegrityError: a file missing, extra, or not as recorded; a checksums.json that is not the pin.
    """
    try:
        listed = tuple(json.loads((Path(folder) / CHECKSUMS_FILE).read_bytes()))
    except (OSError, ValueError) as error:
        raise IntegrityError(f"{folder}/{CHECKSUMS_FILE}: cannot be read ({error})") from None
    missing = [name for name in BASE_FILES if name not in listed]
    if missing:
        raise IntegrityError(f"{folder}: {', '.join(missing)} not listed in {CHECKSUMS_FILE}; not a model folder")
    verify_checksums(folder, listed, pin)


def copy_model_folder(src: str, target: str) -> str:
    """Copy a gptforge model folder's files to `target` with a checksums.json; returns its sha256.

    Raises:
        ConversionError: a file is missing, or the model is not a float one.
    """
    raw = _config_json(src)
    _check_float(raw, src)
    storage.delete_folder(target)  # a damaged earlier copy: no file of it may stay
    with storage.staged(target) as folder:
        for name in BASE_FILES:
            location = storage.join(src, name)
            if not storage.is_file(location):
                raise ConversionError(f"finetune.init_from={src!r}: no {name}; a gptforge model folder holds "
                                      f"{', '.join(BASE_FILES)} (a Hugging Face GPT-2 folder is converted)")
            (folder / name).write_bytes(storage.read_bytes(location))
        return write_checksums(folder)


def import_hf_folder(src: str, target: str, pad_vocab_to: int) -> str:
    """Convert the Hugging Face GPT-2 folder `src` (path or storage URI) into a gptforge model folder
    at `target` (components/hf_gpt2.py); returns the sha256 of its checksums.json.

    Raises:
        ConversionError: as `hf_gpt2.import_hf`.
    """
    from components.hf_gpt2 import import_hf

    with tempfile.TemporaryDirectory(prefix="gptforge-import-") as tmp:
        local = src if not storage.is_remote(src) else str(storage.download_folder(src, Path(tmp) / "hf"))
        out = Path(tmp) / "model"
        done = import_hf(local, out, pad_vocab_to)
        storage.delete_folder(target)  # a damaged earlier copy: no file of it may stay
        with storage.staged(target) as folder:
            for path in out.iterdir():  # what checksums.json lists (a chat template too, when the folder has one)
                (folder / path.name).write_bytes(path.read_bytes())
    return done.checksums_sha256


def check_float_model(folder: str | Path, what: str) -> None:
    """Raises ConversionError when the model folder holds a quantized (int8/int4) model."""
    _check_float(_config_json(str(folder)), what)


def _check_float(raw: dict, what: str) -> None:
    quantization = raw.get("quantization", "fp32")
    if quantization not in FLOAT_MODELS:
        raise ConversionError(f"finetune.init_from={what!r}: holds a {quantization!r} model; fine-tuning starts "
                              f"from a float one ({', '.join(FLOAT_MODELS)}), e.g. another registry version")


def _config_json(location: str) -> dict:
    path = storage.join(location, CONFIG_FILE)
    try:
        raw = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise ConversionError(f"finetune.init_from={location!r}: no {CONFIG_FILE}; expected a gptforge model "
                              f"folder or a Hugging Face GPT-2 folder") from None
    except (OSError, ValueError) as error:
        raise ConversionError(f"finetune.init_from={location!r}: cannot read {CONFIG_FILE} ({error})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return raw


def _file_sha256(location: str) -> str:
    fs, path = storage.resolve(location)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()

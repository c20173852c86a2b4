"""Stage cache keys: which finished stage output a new run may reuse instead of recomputing.

A stage's key is a sha256 over
- its code version: the source of every project module (components, pipelines) that its
  entry modules import, directly or through each other,
- its config section (without `cache` itself, which only says whether to look),
- the keys of its inputs, and for prepare_data the fingerprint of the data sources. The fine-tune
  stage's inputs are the data's key and its starting point's: the pretrain stage's key, or the
  sha256 of the `finetune.init_from` model's files (pipelines/init_from.py), so another starting
  model, or an alias that moved to another version, is another key.
Equal keys mean equal inputs, so the output recorded under a key can be reused while
its files are still there and complete. The lookup itself is an MLflow search
(`pipelines.run_queries.cached_outputs`); this module only computes keys and checks files.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Callable

from components import checkpoint as ckpt
from components import storage
from components.artifacts import Checkpoint, TokenizedData
from components.experiment_file import ExperimentConfig

CACHED_STAGES = ("prepare_data", "pretrain", "finetune")  # the later stages take seconds: they always run

# The modules a stage's code starts from; `code_modules` follows their imports from there. The
# closure is taken from the imports found in the source (`ast`), at module and at function level
# since the code imports lazily inside functions, rather than from a hand-kept list, which misses
# the next module someone adds. It is per module, not per function: pipelines.stages wires every
# stage, so an edit to anything it imports (evaluate, quantize, the tracking modules) also counts
# as a code change for the cached stages. Recomputing is the safe side of that.
_ENTRIES = {
    "prepare_data": ("components.data", "pipelines.stages"),
    "pretrain": ("pipelines.stages", "pipelines.ray_runtime", "components.recipe"),
    "finetune": ("pipelines.stages", "pipelines.ray_runtime", "components.recipe"),
}
_PACKAGES = ("components", "pipelines")  # the project's own code; the installed libraries are not hashed
_ROOT = Path(__file__).resolve().parents[1]  # the folder holding components/ and pipelines/

# The finetune keys that the data stage reads (it also builds the SFT pairs).
_SFT_DATA_KEYS = ("source", "format", "max_bytes", "max_pairs", "heldout_fraction")


def stage_key(stage: str, cfg: ExperimentConfig, inputs: tuple[str, ...] = (), data_fingerprint: str = "") -> str:
    """The cache key of `stage` under `cfg`, given its inputs' keys (and the sources' fingerprint)."""
    payload = {
        "stage": stage,
        "code": code_version(stage),
        "config": stage_config(stage, cfg),
        "inputs": list(inputs),
        "data": data_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def stage_config(stage: str, cfg: ExperimentConfig) -> dict:
    """The part of the experiment that `stage` reads."""
    def section(obj) -> dict:
        values = dataclasses.asdict(obj)
        values.pop("cache", None)
        return values

    if stage == "prepare_data":
        return {"data": section(cfg.data), "tokenizer": section(cfg.tokenizer),
                "finetune": {k: getattr(cfg.finetune, k) for k in _SFT_DATA_KEYS}}
    if stage == "pretrain":
        return {"pretrain": section(cfg.pretrain), "model": section(cfg.model)}
    if stage == "finetune":
        return {"finetune": section(cfg.finetune)}
    raise ValueError(f"no cache key for stage {stage!r}")  # a bug: only CACHED_STAGES have keys


def cache_enabled(stage: str, cfg: ExperimentConfig) -> bool:
    """The per-stage `cache:` switch of the experiment file (data.cache for prepare_data)."""
    return {"prepare_data": cfg.data, "pretrain": cfg.pretrain, "finetune": cfg.finetune}[stage].cache


@lru_cache(maxsize=None)
def code_version(stage: str, read_source: Callable[[Path], bytes] = Path.read_bytes) -> str:
    """sha256 over the source of every module in `code_modules(stage)`.

    `read_source` reads a module's file (tests pass an edited copy); the key is computed
    once per process for the files on disk.
    """
    h = hashlib.sha256()
    for name, source in _closure(stage, read_source).items():
        h.update(name.encode() + b"\0" + source + b"\0")
    return h.hexdigest()


def code_modules(stage: str, read_source: Callable[[Path], bytes] = Path.read_bytes) -> tuple[str, ...]:
    """The project modules whose source decides `stage`'s output, sorted by name."""
    return tuple(_closure(stage, read_source))


def _closure(stage: str, read_source: Callable[[Path], bytes]) -> dict[str, bytes]:
    """Module name -> source, for `stage`'s entry modules and every project module they import."""
    sources: dict[str, bytes] = {}
    todo = list(_ENTRIES[stage])
    while todo:
        name = todo.pop()
        if name in sources:
            continue
        path = _module_file(name)
        if path is None:  # `from components.experiment_file import ExperimentConfig` names a class, not a module
            assert name not in _ENTRIES[stage], f"entry module {name} of stage {stage} not found under {_ROOT}"
            continue
        sources[name] = read_source(path)
        tree = ast.parse(sources[name], filename=str(path))
        todo.extend(n for n in _imported(tree, name, path.name == "__init__.py") if n.split(".")[0] in _PACKAGES)
    return dict(sorted(sources.items()))


def _module_file(name: str) -> Path | None:
    base = _ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name an import anywhere in `tree` may load, with the packages above it.

    `from a.b import c` may load `a.b.c` (a submodule) or only read the name `c` from `a.b`;
    both candidates are returned and `_module_file` keeps those that exist.
    """
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` in package a.b means a.b.x
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    # Importing a.b.c runs a/__init__.py and a/b/__init__.py first.
    return {".".join(name.split(".")[:i]) for name in names for i in range(1, name.count(".") + 2)}


def output_complete(record) -> bool:
    """Whether every file a recorded stage output points at is still there, whole."""
    if isinstance(record, TokenizedData):
        return _data_complete(record)
    if isinstance(record, Checkpoint):
        return ckpt.step_of(record.uri) is not None  # its checkpoint.json lists every file with its size
    return False


def _data_complete(record: TokenizedData) -> bool:
    """manifest.json is written last (components/data.py) and lists every shard: all of them and the
    SFT files and tokenizer must still be there, locally or in the bucket."""
    try:
        manifest = json.loads(storage.read_bytes(record.manifest_uri))
        shards = [storage.join(record.root, name) for split in manifest["splits"].values() for name in split["files"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False  # missing, unreadable or of an older format: recompute
    paths = [*shards, record.sft_train_uri, record.sft_heldout_uri, record.tokenizer_uri]
    return all(storage.is_file(p) for p in paths)

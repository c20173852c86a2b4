"""`gptforge import-hf` and `gptforge export-hf`: Hugging Face GPT-2 folders in and out.

The conversion is components/hf_gpt2.py; this module adds the command line and, for export,
the registry: `models:/NAME@ALIAS` and `models:/NAME/VERSION` are downloaded and checked
against the sha256 the registry pinned, as serving does, and converted from the checked bytes.
Nothing reaches the network but the tracking server.
"""
from __future__ import annotations

import argparse
import re
import tempfile

REGISTRY_PREFIX = "models:/"
_REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))")


def add_commands(sub) -> None:
    """Add `import-hf` and `export-hf` to the `gptforge` subparsers `sub`."""
    imp = _command(
        sub, "import-hf", import_command, ("path", "local Hugging Face GPT-2 folder"), "gptforge model",
        help="convert a local Hugging Face GPT-2 folder into a gptforge model folder",
        description="Read config.json, model.safetensors (or pytorch_model.bin, loaded weights-only) and "
                    "tokenizer.json (or vocab.json + merges.txt) from PATH and write a gptforge model folder "
                    "(model.safetensors, config.json, tokenizer.json, checksums.json) at OUT. The tokenizer is "
                    "kept as it is: GPT-2's <|endoftext|> stays id 50256.")
    imp.add_argument("--pad-vocab-to", type=int, default=1, metavar="N",
                     help="round the vocabulary up to a multiple of N, as model.pad_vocab_to (default: 1, none)")
    exp = _command(
        sub, "export-hf", export_command, ("model", "model folder, models:/NAME@ALIAS or models:/NAME/VERSION"),
        "Hugging Face", help="write a gptforge model as a Hugging Face GPT-2 folder",
        description="Write OUT so that transformers.GPT2LMHeadModel.from_pretrained(OUT) and "
                    "AutoTokenizer.from_pretrained(OUT) load it. MODEL is a gptforge model folder, or "
                    "models:/NAME@ALIAS or models:/NAME/VERSION from the MLflow registry (checked against the "
                    "registry's sha256). Vocabulary padding rows are dropped; a bias=False model gets zero biases.")
    exp.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking server for models:/ (default: MLFLOW_TRACKING_URI, else the default "
                          "experiment's local store)")


def _command(sub, name: str, handler, source: tuple[str, str], kind: str, **text) -> argparse.ArgumentParser:
    """A subcommand NAME SOURCE OUT that writes a new `kind` folder at OUT."""
    parser = sub.add_parser(name, **text)
    parser.add_argument(source[0], metavar=source[0].upper(), help=source[1])
    parser.add_argument("out", metavar="OUT", help=f"new {kind} folder (must not exist, or be empty)")
    parser.set_defaults(handler=handler)
    return parser


def import_command(args) -> int:
    from components.hf_gpt2 import import_hf

    done = import_hf(args.path, args.out, args.pad_vocab_to)
    c = done.config
    padding = c.vocab_size - done.tokens
    print(f"imported {args.path} -> {args.out}: n_layer={c.n_layer} n_head={c.n_head} n_embd={c.n_embd} "
          f"block_size={c.block_size} vocab_size={c.vocab_size}"
          + (f" ({padding} padding rows)" if padding else ""))
    print(f"  tokenizer: {done.tokens} tokens, <|endoftext|> id {done.eot_id}; checksums.json sha256 "
          f"{done.checksums_sha256}")
    if done.tanh_gelu:
        print("  note: the checkpoint uses the tanh approximation of GELU; gptforge computes the exact GELU, "
              "so logits are close to (not identical with) Hugging Face's")
    return 0


def export_command(args) -> int:
    from components.hf_gpt2 import export_hf

    with tempfile.TemporaryDirectory(prefix="gptforge-export-") as tmp:
        if args.model.startswith(REGISTRY_PREFIX):
            folder, pin = _registry_folder(args.model, args.tracking_uri, tmp)
        else:
            folder, pin = args.model, None
        done = export_hf(folder, args.out, pin)
    print(f"exported {args.model} -> {args.out}: vocab_size={done.tokens}, <|endoftext|> id {done.eot_id}"
          + ("; bias=False model: zero biases written" if done.zero_biases else ""))
    print(f"  load it: transformers.GPT2LMHeadModel.from_pretrained({args.out!r}), "
          f"AutoTokenizer.from_pretrained({args.out!r})")
    return 0


def _registry_folder(uri: str, tracking_uri: str | None, tmp: str) -> tuple[str, str]:
    """Download the version `uri` names into `tmp`; returns its folder and the sha256 the registry pins.

    Raises:
        ConversionError: `uri` is not models:/NAME@ALIAS or models:/NAME/VERSION.
        LookupError, TrackingError, IntegrityError: as `RegistryLoader.fetch`.
    """
    from components.hf_files import ConversionError
    from pipelines.model_loading import fetch_version
    from pipelines.registry import find_alias, model_version

    match = _REGISTRY_URI.fullmatch(uri)
    if not match:
        # Worded so that the CLI's redaction of `user:secret@host` leaves the hint alone.
        raise ConversionError(f"MODEL {uri!r}: not a registry reference; use models:/NAME/VERSION, or "
                              f"models:/NAME followed by @ALIAS (e.g. @champion)")
    tracking_uri = tracking_uri or _default_tracking_uri()
    name = match["name"]
    version = (find_alias(tracking_uri, name, match["alias"]) if match["alias"]
               else model_version(tracking_uri, name, match["version"]))
    loader = fetch_version(tracking_uri, name, version, tmp, purpose="export")
    return loader.folder, loader.checksums_sha256


def _default_tracking_uri() -> str:
    from pipelines.cli_experiment import load_experiment
    from pipelines.tracking import resolve_tracking_uri

    return resolve_tracking_uri(load_experiment(argparse.Namespace(experiment=None, overrides=[])).workdir)

"""What the endpoint serves: a loaded model, and the loaders that produce one.

The Serve deployment takes its loader as an argument (house style 7): the CLI hands
it `RegistryLoader` (download `models:/NAME@champion`, check its files against the
sha256 pinned on the registry version, load), tests may hand it `FolderLoader` on a
model folder they made. The registry is reached through `pipelines.registry` only.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from components.files import IntegrityError
from components.tokenizer import TOKENIZER_FILE
from pipelines.serving import ServeError


@dataclass
class LoadedModel:
    model: object  # a GPT or a quantized GPT: has .new_cache and .config
    tokenizer: object  # tokenizers.Tokenizer
    model_id: str  # what /v1/models and responses call it, e.g. "tiny:v3"
    version: str | None = None  # the registry version, when it came from the registry
    run_id: str | None = None  # the MLflow run that produced it
    precision: str = "fp32"  # the stored variant: fp32, bf16, int8_dynamic, ...
    parameters: int = 0
    text: object = field(default=None, repr=False)  # components.generation.TokenText of the tokenizer
    chat_template: str | None = None  # the Jinja chat template of tokenizer_config.json; None: no chat route

    def __post_init__(self):
        from components.rows import TokenText
        from components.accounting import parameter_counts

        if self.text is None:
            self.text = TokenText(self.tokenizer, self.model.config.vocab_size)
        if not self.parameters:
            self.parameters = parameter_counts(self.model)["total"]

    @property
    def eot_id(self) -> int:
        """The end-of-text id that ends a completion: 0 in gptforge's tokenizers, 50256 in GPT-2's."""
        from components.tokenizer import EOT, EOT_ID

        found = self.tokenizer.token_to_id(EOT)
        return EOT_ID if found is None else found

    def describe(self, created: int) -> dict:
        """The /v1/models entry: OpenAI's fields plus what a caller needs to trust the model."""
        name = self.model_id.split(":")[0]
        return {"id": self.model_id, "object": "model", "created": created, "owned_by": "gptforge",
                "name": name, "version": self.version, "run_id": self.run_id,
                "parameters": self.parameters, "precision": self.precision}


@dataclass(frozen=True)
class FolderLoader:
    """Load a candidate folder: exactly model.safetensors + config.json + tokenizer.json + checksums.json.

    `checksums_sha256`, when given, is the registry's pin of checksums.json (see
    `pipelines.registry.CHECKSUMS_TAG`); without it the folder is only checked against itself.
    """

    folder: str
    model_id: str = "local"
    checksums_sha256: str | None = None
    version: str | None = None
    run_id: str | None = None

    def verify(self) -> None:
        """Raises IntegrityError naming the file that is missing, extra, unlisted or altered."""
        from components.files import verify_checksums
        from components.quantize import candidate_files

        verify_checksums(self.folder, candidate_files(self.folder), self.checksums_sha256)

    def precision(self) -> str:
        with open(os.path.join(self.folder, "config.json")) as f:
            return json.load(f).get("quantization", "fp32")

    def check_device(self, device: str, precision: str | None = None) -> None:
        """Raises ServeError when the stored variant (`precision`, by default read from the folder)
        cannot run on `device` (int4 needs CUDA)."""
        from components.quantize import RUNS_ON

        precision = precision or self.precision()
        if device.split(":")[0] not in RUNS_ON.get(precision, ()):
            raise ServeError(f"{self.model_id} is a {precision} model, which runs only on "
                             f"{'/'.join(RUNS_ON.get(precision, ()))}; this endpoint runs on {device}. Serve it "
                             f"with serve.num_gpus=1 on a GPU machine, or promote another version "
                             f"(gptforge promote EXPERIMENT --version N)")

    def __call__(self, device: str = "cpu") -> LoadedModel:
        """Verify and load from the same bytes: a file rewritten after its check is never what is loaded.

        Raises:
            IntegrityError: as `verify`. ServeError: as `check_device`.
        """
        from tokenizers import Tokenizer

        from components.chat import TOKENIZER_CONFIG_FILE, ChatError, parse_chat_template
        from components.files import read_verified
        from components.model import CONFIG_FILE, WEIGHTS_FILE
        from components.quantize import candidate_files, load_variant_bytes

        checked = read_verified(self.folder, candidate_files(self.folder), self.checksums_sha256)
        template = None
        try:  # parsed from the verified bytes: the template served is the one checksums.json records
            if TOKENIZER_CONFIG_FILE in checked:
                template = parse_chat_template(checked[TOKENIZER_CONFIG_FILE],
                                               os.path.join(self.folder, TOKENIZER_CONFIG_FILE))
        except ChatError as error:
            raise ServeError(str(error)) from None
        precision = json.loads(checked[CONFIG_FILE]).get("quantization", "fp32")
        self.check_device(device, precision)
        model = load_variant_bytes(checked[CONFIG_FILE], checked[WEIGHTS_FILE], device, self.folder)
        tokenizer = Tokenizer.from_str(checked[TOKENIZER_FILE].decode())
        return LoadedModel(model, tokenizer, self.model_id, self.version, self.run_id, precision,
                           chat_template=template)


@dataclass(frozen=True)
class RegistryLoader:
    """Load the version an alias of a registered model points at (by default `champion`).

    Files are downloaded once per version into `cache_dir/<name>-v<version>` and
    checked at every load against the sha256 the registry pinned at registration.
    A cached copy that fails the check is discarded and downloaded once more;
    a fresh download that fails it is refused.
    """

    tracking_uri: str
    model_name: str
    cache_dir: str
    alias: str = "champion"

    def fetch(self) -> FolderLoader:
        """Download (unless cached) and verify the version's files; returns a loader for the checked folder.

        Raises:
            LookupError: no such model or alias. TrackingError: the registry failed.
            IntegrityError: the files do not match the registry's record, even freshly downloaded.
        """
        from pipelines.registry import find_alias

        version = find_alias(self.tracking_uri, self.model_name, self.alias)
        return fetch_version(self.tracking_uri, self.model_name, version, self.cache_dir)

    def __call__(self, device: str = "cpu") -> LoadedModel:
        return self.fetch()(device)

    def current_version(self) -> str:
        """The version the alias points at now (one registry call; the endpoint polls it)."""
        from pipelines.registry import find_alias

        return str(find_alias(self.tracking_uri, self.model_name, self.alias).version)


def fetch_version(tracking_uri: str, model_name: str, version, cache_dir: str, purpose: str = "serve") -> FolderLoader:
    """A registered version's files (an mlflow ModelVersion), downloaded unless cached into
    `cache_dir/<name>-v<version>`, checked against the sha256 the registry pinned; a loader for them.

    A cached copy that fails the check is discarded and downloaded once more; a fresh download
    that fails it is refused. `purpose` says in the error what was refused (serve, export, ...).

    Raises:
        IntegrityError: no pin on the version, or files that do not match it, even freshly downloaded.
        TrackingError: the registry failed.
    """
    from pipelines.registry import CHECKSUMS_TAG, download_version
    from pipelines.tracking import redact

    model_id = f"{model_name}:v{version.version}"
    pinned = version.tags.get(CHECKSUMS_TAG)
    if not pinned:
        raise IntegrityError(f"{model_id} has no {CHECKSUMS_TAG} tag in the registry at "
                             f"{redact(tracking_uri)}, so its files cannot be verified; refusing to {purpose} it "
                             f"(register it again with `gptforge run`)")
    target = Path(cache_dir) / f"{model_name}-v{version.version}"
    loader = FolderLoader(str(target), model_id, pinned, str(version.version), version.run_id)
    if target.exists():
        try:
            loader.verify()
            return loader
        except IntegrityError as error:
            logging.getLogger(__name__).warning("discarding the damaged cached copy of %s: %s", model_id, error)
    # A name of its own: replicas and the CLI may download the same version at once.
    staging = target.with_name(f"{target.name}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    shutil.rmtree(staging, ignore_errors=True)
    folder = download_version(tracking_uri, version, str(staging))
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(folder, target)  # a complete folder or none under the final name
    except OSError:
        if not target.exists():  # otherwise another process put its verified copy there first
            raise
    shutil.rmtree(staging, ignore_errors=True)
    loader.verify()
    return loader

"""The MLflow model registry of gptforge: versions, the `champion`/`previous` aliases, downloads.

A registered model is named after its experiment; each version points at the `model`
folder of a candidate run. `champion` is what serving loads; `previous` is the champion
it replaced, kept for rollback. Every function takes the tracking URI, which is also
the registry's.

A failed call raises `TrackingError` (nothing changed); a missing model, version or
alias is `LookupError` or None, as each function says, so an unreachable registry never
looks like an empty one.
"""
from __future__ import annotations

from pipelines.tracking import configure_mlflow, is_not_found, mlflow_client, redact, tracking_call

CHAMPION = "champion"
PREVIOUS = "previous"
# Model version tag: sha256 of the version's checksums.json, recorded at registration.
# The registry (the tracking database) pins what the artifact store must hold.
CHECKSUMS_TAG = "checksums.sha256"


def register(tracking_uri: str, model_name: str, run_id: str, artifact_path: str, tags: dict) -> str:
    """Register the folder `artifact_path` of `run_id` as a new version; returns the version.

    Raises:
        TrackingError: the registry failed (anything but "the model does not exist yet").
    """
    from mlflow.exceptions import MlflowException

    with tracking_call(tracking_uri, f"registering a version of {model_name!r}"):
        client = mlflow_client(tracking_uri)
        try:
            client.get_registered_model(model_name)
        except MlflowException as error:
            if not is_not_found(error):
                raise
            client.create_registered_model(model_name, description="gptforge champion/challenger line")
        version = client.create_model_version(
            model_name, source=f"runs:/{run_id}/{artifact_path}", run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
        )
    return version.version


def find_alias(tracking_uri: str, model_name: str, alias: str = CHAMPION):
    """The model version `alias` points at.

    Raises:
        LookupError: the model or alias does not exist (nothing promoted yet).
        TrackingError: any other failure (server unreachable, 5xx, a broken store).
    """
    from mlflow.exceptions import MlflowException

    missing = LookupError(
        f"no model version with alias {alias!r} for registered model {model_name!r} in {redact(tracking_uri)}; "
        f"run `gptforge run` first (or check MLFLOW_TRACKING_URI and the experiment name)")
    # Not get_model_version_by_alias: a missing alias and a bad request share its error code,
    # while a missing model has its own (RESOURCE_DOES_NOT_EXIST) and the aliases are listed.
    with tracking_call(tracking_uri, f"looking up {model_name}@{alias}"):
        client = mlflow_client(tracking_uri)
        try:
            model = client.get_registered_model(model_name)
        except MlflowException as error:
            if is_not_found(error):
                raise missing from None
            raise
        if alias not in model.aliases:
            raise missing
        return client.get_model_version(model_name, model.aliases[alias])


def alias_version(tracking_uri: str, model_name: str, alias: str):
    """The model version an alias points at, or None when the model or alias does not exist.

    Raises:
        TrackingError: the registry failed; that is not the same as "no champion yet".
    """
    try:
        return find_alias(tracking_uri, model_name, alias)
    except LookupError:
        return None


def move_champion(tracking_uri: str, model_name: str, version: str) -> None:
    """Point `champion` at `version`; the old champion becomes `previous` (for rollback)."""
    old = alias_version(tracking_uri, model_name, CHAMPION)
    with tracking_call(tracking_uri, f"moving the {CHAMPION!r} alias of {model_name!r}"):
        client = mlflow_client(tracking_uri)
        if old is not None and old.version != version:
            client.set_registered_model_alias(model_name, PREVIOUS, old.version)
        client.set_registered_model_alias(model_name, CHAMPION, version)


def model_version(tracking_uri: str, model_name: str, version: str):
    """A registered version. Raises LookupError when the model or version does not exist."""
    from mlflow.exceptions import MlflowException

    with tracking_call(tracking_uri, f"reading {model_name} v{version}"):
        try:
            return mlflow_client(tracking_uri).get_model_version(model_name, str(version))
        except MlflowException as error:
            if is_not_found(error):
                raise LookupError(f"no version {version} of registered model {model_name!r} in "
                                  f"{redact(tracking_uri)}") from None
            raise


def set_version_tags(tracking_uri: str, model_name: str, version: str, tags: dict) -> None:
    """Tags on a registered version (the promotion decisions that concern it)."""
    with tracking_call(tracking_uri, f"tagging {model_name} v{version}"):
        client = mlflow_client(tracking_uri)
        for key, value in tags.items():
            client.set_model_version_tag(model_name, str(version), key, str(value))


def download_version(tracking_uri: str, version, dst_dir: str) -> str:
    """Download the files of a model version (from `find_alias`) under `dst_dir`; returns their folder."""
    import mlflow.artifacts

    configure_mlflow()
    with tracking_call(tracking_uri, f"downloading {version.source}"):
        return mlflow.artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=tracking_uri,
                                                   dst_path=dst_dir)

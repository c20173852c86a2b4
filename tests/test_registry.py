"""The registry pins each version's files; serving checks them (real MLflow SQLite store, no Ray)."""
import os
import shutil

import pytest
from mlflow import MlflowClient

from components.experiment_file import load_config
from components.files import CHECKSUMS_FILE, IntegrityError, sha256_file
from pipelines import promotion
from pipelines.model_loading import RegistryLoader
from pipelines.registry import CHAMPION, CHECKSUMS_TAG, alias_version, find_alias, move_champion, register
from pipelines.tracking import Tracker
from tests.helpers import make_candidate, promote_candidates

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["name=pinned"])
    tracker = Tracker(uri, cfg.name, artifact_location=str(tmp_path / "artifacts"))
    decision, version = promote_candidates(tracker, cfg, tmp_path, {"fp32": 10.0})
    assert decision.promote
    return {"uri": uri, "cfg": cfg, "tracker": tracker, "version": version, "tmp": tmp_path,
            "loader": RegistryLoader(uri, cfg.name, str(tmp_path / "serving"))}


def _stored(registry):
    """The version's folder in the artifact store (what an attacker with artifact write access edits)."""
    version = find_alias(registry["uri"], registry["cfg"].name)
    run = MlflowClient(registry["uri"]).get_run(version.run_id)
    root = run.info.artifact_uri.removeprefix("file://")
    return os.path.join(root, promotion.MODEL_ARTIFACT)


def test_registration_pins_the_sha256_of_checksums_json(registry):
    version = find_alias(registry["uri"], registry["cfg"].name, CHAMPION)
    assert version.version == registry["version"]
    assert version.tags[CHECKSUMS_TAG] == sha256_file(os.path.join(_stored(registry), CHECKSUMS_FILE))
    assert version.tags["promote.decision"] == "champion" and "no comparable champion" in version.tags["promote.reason"]
    loaded = registry["loader"]()
    assert loaded.model_id == f"pinned:v{registry['version']}"


def test_files_rewritten_in_the_artifact_store_are_refused(registry):
    other = registry["tmp"] / "other"
    make_candidate(other, "fp32", seed=1)  # another candidate, consistent with its own checksums.json
    for name in ("model.safetensors", CHECKSUMS_FILE):
        shutil.copy(other / name, os.path.join(_stored(registry), name))
    with pytest.raises(IntegrityError, match=rf"{CHECKSUMS_FILE}: sha256 does not match the one pinned in the model "
                                             rf"registry"):
        registry["loader"]()


def test_a_truncated_cached_file_is_downloaded_again_once(registry):
    registry["loader"].fetch()
    cached = registry["tmp"] / "serving" / f"pinned-v{registry['version']}" / "model.safetensors"
    good = cached.read_bytes()
    cached.write_bytes(good[: len(good) // 2])
    loaded = registry["loader"]()  # the damaged copy is discarded, the download checks out
    assert cached.read_bytes() == good and loaded.model_id.endswith(f"v{registry['version']}")

    # When the store's copy is damaged too, the one new download fails the check and it gives up.
    cached.write_bytes(b"")
    stored = os.path.join(_stored(registry), "model.safetensors")
    with open(stored, "r+b") as f:
        f.truncate(100)
    with pytest.raises(IntegrityError, match=r"model.safetensors: sha256 does not match"):
        registry["loader"]()


def test_a_version_registered_without_a_pin_is_not_served(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["name=unpinned"])
    tracker = Tracker(uri, cfg.name, artifact_location=str(tmp_path / "artifacts"))
    with pytest.raises(RuntimeError, match=CHECKSUMS_TAG):
        promote_candidates(tracker, cfg, tmp_path, {"fp32": 10.0}, tag=False)
    assert alias_version(uri, cfg.name, CHAMPION) is None  # nothing registered, nothing moved

    with tracker.run("candidate") as run:  # registered by hand, the old way
        make_candidate(tmp_path / "hand", "fp32")
        run.log_artifacts(str(tmp_path / "hand"), "model")
    move_champion(uri, cfg.name, register(uri, cfg.name, run.run_id, "model", {}))
    with pytest.raises(IntegrityError, match=f"no {CHECKSUMS_TAG} tag"):
        RegistryLoader(uri, cfg.name, str(tmp_path / "serving"))()

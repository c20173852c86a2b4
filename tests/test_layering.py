"""components/ must stay plain Python: no Ray, no MLflow, and nothing from pipelines/ (the layer above it)."""
import subprocess
import sys

from tests.helpers import REPO


def test_components_import_neither_ray_nor_mlflow_nor_pipelines():
    modules = sorted(p.stem for p in (REPO / "components").glob("*.py") if p.stem != "__init__")
    code = (
        "import sys\n"
        + "".join(f"import components.{m}\n" for m in modules)
        + "bad = [m for m in ('ray', 'mlflow', 'pipelines') if m in sys.modules]\n"
        + "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)

"""Writing files so that a reader never sees a half-written one."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

CHECKSUMS_FILE = "checksums.json"


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it to `path`.

    The rename is atomic on one filesystem, so a crash leaves either the old file or
    none, never a truncated one presented as complete.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_checksums(folder: str | Path) -> None:
    """Record the sha256 of every file in `folder` in checksums.json; loaders check it (verify_checksums)."""
    folder = Path(folder)
    sums = {p.name: _sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    write_json_atomic(folder / CHECKSUMS_FILE, sums)


def verify_checksums(folder: str | Path) -> None:
    """Raise ValueError naming the first file whose sha256 differs from checksums.json, or is missing."""
    path = Path(folder) / CHECKSUMS_FILE
    if not path.exists():
        raise ValueError(f"{folder}: no {CHECKSUMS_FILE}; refusing to load unverified weights")
    for name, expected in json.loads(path.read_text()).items():
        file = Path(folder) / name
        if not file.exists() or _sha256(file) != expected:
            raise ValueError(f"{file}: sha256 does not match {CHECKSUMS_FILE}; the artifact is damaged or altered")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

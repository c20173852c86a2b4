"""Writing files so that a reader never sees a half-written one, and checking them before use."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Callable, Collection

CHECKSUMS_FILE = "checksums.json"


class IntegrityError(ValueError):
    """A model folder is not exactly what was written: the message names the file."""


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it to `path`.

    The file is fsynced before the rename and its folder after it, so even across
    a power loss the name holds either the old file or the complete new one, never
    a truncated one presented as complete.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)  # the rename itself lives in the folder's entry
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def write_checksums(folder: str | Path) -> str:
    """Record the sha256 of every file in `folder` in checksums.json; loaders check it (verify_checksums).

    Returns:
        The sha256 of the checksums.json written: pin it somewhere the artifact store
        cannot rewrite (the registry), and pass it to `verify_checksums`.
    """
    folder = Path(folder)
    sums = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_FILE}
    write_json_atomic(folder / CHECKSUMS_FILE, sums)
    return sha256_file(folder / CHECKSUMS_FILE)


def verify_checksums(folder: str | Path, files: Collection[str], checksums_sha256: str | None = None) -> None:
    """Check that `folder` holds exactly `files` plus checksums.json, each as checksums.json records it.

    To load the files, use `read_verified`: a file checked here can still change before it is opened again.

    Args:
        folder: the model folder.
        files: the plain file names its format needs (for a candidate: weights, config, tokenizer).
        checksums_sha256: the sha256 of checksums.json as pinned elsewhere (the model
            version's registry tag). Without it, someone who can rewrite the weights in the
            artifact store can rewrite checksums.json to match.

    Raises:
        IntegrityError: naming the file that is missing, extra, unlisted, not a plain
            file name, damaged, or a checksums.json that does not match the pin.
    """
    _verified(Path(folder), files, checksums_sha256, keep=False)


def read_verified(folder: str | Path, files: Collection[str], checksums_sha256: str | None = None) -> dict[str, bytes]:
    """The contents of `files` in `folder`, checked as `verify_checksums` checks them; parse these bytes.

    Each file is read once and its sha256 computed on the very bytes returned, so a file
    rewritten after the check (or while it is read) cannot be what the caller loads.

    Returns:
        file name -> its bytes, for every name in `files`.

    Raises:
        IntegrityError: as `verify_checksums`.
    """
    return _verified(Path(folder), files, checksums_sha256, keep=True)


def _verified(folder: Path, files: Collection[str], checksums_sha256: str | None, keep: bool) -> dict[str, bytes]:
    """The check of `verify_checksums`; with `keep`, the bytes that were checked, by file name."""
    record = folder / CHECKSUMS_FILE
    read = _read_regular(record, keep=True)
    if read is None:
        raise IntegrityError(f"{record}: missing; refusing to load unverified weights")
    record_sha256, record_bytes = read
    if checksums_sha256 is not None and record_sha256 != checksums_sha256:
        raise IntegrityError(f"{record}: sha256 does not match the one pinned in the model registry; "
                             f"the artifact was altered after it was registered")
    try:
        sums = json.loads(record_bytes)
    except (ValueError, UnicodeDecodeError) as error:
        raise IntegrityError(f"{record}: not valid JSON ({error})") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise IntegrityError(f"{record}: expected a mapping of file name to sha256")
    bad_names = [name for name in sums if not _plain_name(name)]
    if bad_names:
        raise IntegrityError(f"{record}: {bad_names[0]!r} is not a plain file name inside the folder")
    present = {p.name for p in folder.iterdir()} - {CHECKSUMS_FILE}
    problems = [f"{folder / n}: not listed in {CHECKSUMS_FILE}" for n in sorted(set(files) - set(sums))]
    problems += [f"{folder / n}: listed in {CHECKSUMS_FILE} but not part of this model format"
                 for n in sorted(set(sums) - set(files))]
    problems += [f"{folder / n}: unexpected file in the model folder" for n in sorted(present - set(files))]
    contents = {}
    for name in sorted(set(files) & set(sums)):
        path = folder / name
        read = _read_regular(path, keep)
        if read is None:
            problems.append(f"{path}: missing (or not a regular file)")
        elif read[0] != sums[name]:
            problems.append(f"{path}: sha256 does not match {CHECKSUMS_FILE}; the artifact is damaged or altered")
        elif keep:
            contents[name] = read[1]
    if problems:
        raise IntegrityError("; ".join(problems))
    return contents


def _read_regular(path: Path, keep: bool) -> tuple[str, bytes | None] | None:
    """The sha256 of the regular file `path` and, with `keep`, its bytes, from one read; None when it is
    missing, unreadable, a symlink or not a regular file. The open itself refuses a symlink, so the file
    checked is the file opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        if keep:
            data = f.read()
            return hashlib.sha256(data).hexdigest(), data
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        return digest.hexdigest(), None


def _plain_name(name: str) -> bool:
    """A bare file name: no folder part, no `..`, nothing a path join could lead outside the folder with."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Stage outputs on a local disk, a shared mount or object storage, all through `pyarrow.fs`.

A location is a string: a local path (`/data/gptforge`, `.gptforge`) or a URI that
`pyarrow.fs.FileSystem.from_uri` opens (`s3://bucket/prefix`, `gs://bucket/prefix`,
`file:///mnt/shared`). Stage records carry these strings, so a task on any node
can open what another wrote. Credentials and endpoints never appear in them: pyarrow
reads them from the standard places (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` /
`AWS_SECRET_ACCESS_KEY`, an instance profile, `GOOGLE_APPLICATION_CREDENTIALS`).

Code that needs a plain folder (safetensors, `tokenizers`) calls `local_copy`, which
copies a remote folder into a node-local cache and verifies it against the checksums
it was written with, on a cache hit too.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pyarrow.fs as pafs

from components.files import CHECKSUMS_FILE, IntegrityError, atomic_write, verify_checksums

_COPY_CHUNK = 8 << 20


class StorageError(OSError):
    """A storage location cannot be opened, read or written: the message names it and says why."""


def is_remote(location: str) -> bool:
    """Whether `location` is a URI other than a local file (s3://, gs://, hdfs://, ...)."""
    scheme = _scheme(location)
    return scheme not in ("", "file")


def _scheme(location: str) -> str:
    head, sep, _ = location.partition("://")
    return head.lower() if sep and head.isalnum() else ""


def normalize(location: str) -> str:
    """A local path made absolute (the same folder from every process); URIs unchanged, less a trailing `/`."""
    if _scheme(location) == "file":
        location = location[len("file://"):]
    if not is_remote(location):
        return str(Path(location).expanduser().resolve())
    return location.rstrip("/")


def join(location: str, *parts: str) -> str:
    """`location/part/...`, for a path or a URI alike."""
    base = normalize(location)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts if p)])


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it that `location` names.

    Raises:
        StorageError: the URI's scheme is unknown or its filesystem cannot be opened.
    """
    location = normalize(location)
    if not is_remote(location):
        return pafs.LocalFileSystem(), location
    try:
        return pafs.FileSystem.from_uri(location)
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError or ValueError by scheme
        raise StorageError(f"cannot open storage {location!r}: {_first_line(error)}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return _call(location, lambda: fs.get_file_info(path).type != pafs.FileType.NotFound)


def is_file(location: str) -> bool:
    fs, path = resolve(location)
    return _call(location, lambda: fs.get_file_info(path).type == pafs.FileType.File)


def file_sizes(location: str) -> dict[str, int]:
    """Name -> size of every file directly in the folder `location` (empty when it does not exist)."""
    fs, path = resolve(location)
    infos = _call(location, lambda: fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))
    return {info.base_name: info.size for info in infos if info.type == pafs.FileType.File}


def find_files(location: str, name: str) -> list[str]:
    """Every file called `name` anywhere below the folder `location`, as locations (sorted)."""
    fs, path = resolve(location)
    infos = _call(location, lambda: fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)))
    base = normalize(location)
    found = [info.path for info in infos if info.type == pafs.FileType.File and info.base_name == name]
    return sorted(join(base, p[len(path):]) for p in found if p.startswith(path))


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return _call(location, read)


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str, data: bytes) -> None:
    """Write a whole file. Locally through a temporary name and a rename; an object store
    makes an object visible only once its upload completes, so a reader never sees half of it."""
    fs, path = resolve(location)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_bytes(data))
        return

    def write() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    _call(location, write)


def upload_folder(local_dir: str | Path, location: str) -> str:
    """Copy every file below `local_dir` to `location` (a no-op when they are the same folder).

    Returns:
        `location`, normalized: what a stage record stores.
    """
    local_dir, location = Path(local_dir).resolve(), normalize(location)
    if not is_remote(location) and Path(location) == local_dir:
        return location
    fs, path = resolve(location)
    _call(location, lambda: fs.create_dir(path, recursive=True))
    _call(location, lambda: pafs.copy_files(str(local_dir), path, source_filesystem=pafs.LocalFileSystem(),
                                            destination_filesystem=fs))
    return location


def download_folder(location: str, local_dir: str | Path) -> Path:
    """Copy every file below `location` into `local_dir` (created); returns `local_dir`."""
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    fs, path = resolve(location)
    _call(location, lambda: pafs.copy_files(path, str(local_dir), source_filesystem=fs,
                                            destination_filesystem=pafs.LocalFileSystem()))
    return local_dir


def delete_folder(location: str) -> None:
    fs, path = resolve(location)
    _call(location, lambda: fs.delete_dir(path) if fs.get_file_info(path).type == pafs.FileType.Directory else None)


def delete_file(location: str) -> None:
    """Delete the file at `location`; nothing to do when there is none."""
    fs, path = resolve(location)
    _call(location, lambda: fs.delete_file(path) if fs.get_file_info(path).type == pafs.FileType.File else None)


def local_cache_root() -> Path:
    """This node's cache of remote folders: `GPTFORGE_CACHE`, else ~/.cache/gptforge."""
    return Path(os.environ.get("GPTFORGE_CACHE") or Path.home() / ".cache" / "gptforge").expanduser()


def local_copy(location: str, files: tuple[str, ...] | None = None, checksums_sha256: str | None = None,
               check: Callable[[Path], bool] | None = None) -> Path:
    """A local folder holding the folder `location`: itself when local, else a verified copy.

    A remote folder is copied into this node's cache, keyed by its location, and checked
    against its checksums.json (and against `checksums_sha256` when given); a cached copy
    is checked again before it is handed out, and fetched anew if it fails.

    Args:
        files: the file names the folder must hold besides checksums.json; None: those it lists.
        check: for a folder without checksums.json (a training checkpoint, whose checkpoint.json
            lists its sizes): True when the copy is complete.

    Raises:
        IntegrityError: the copy does not match its checksums.
        StorageError: the location cannot be read.
    """
    if not is_remote(location):
        return Path(normalize(location))
    key = hashlib.sha256(normalize(location).encode()).hexdigest()[:24]
    target = local_cache_root() / "folders" / key
    if target.is_dir():
        try:
            _verify(target, files, checksums_sha256, check)
            return target
        except IntegrityError:
            shutil.rmtree(target, ignore_errors=True)  # a damaged or stale copy: fetch it again
    staging = target.with_name(f".{key}.{uuid.uuid4().hex[:8]}")
    try:
        download_folder(location, staging)
        _verify(staging, files, checksums_sha256, check)
        try:
            os.replace(staging, target)  # another task may have won the race with the same bytes
        except OSError:
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _verify(folder: Path, files: tuple[str, ...] | None, checksums_sha256: str | None,
            check: Callable[[Path], bool] | None) -> None:
    if not (folder / CHECKSUMS_FILE).is_file():
        if check is None or check(folder):
            return
        raise IntegrityError(f"{folder}: incomplete copy (its files do not match their manifest)")
    if files is None:
        files = tuple(json.loads((folder / CHECKSUMS_FILE).read_text()))
    verify_checksums(folder, files, checksums_sha256)


def local_file(location: str, folder: str | Path) -> Path:
    """The file `location` as a local path: itself when local, else a fresh copy in `folder`."""
    if not is_remote(location):
        return Path(normalize(location))
    target = Path(folder) / location.rpartition("/")[2]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(read_bytes(location))
    return target


@contextmanager
def staged(location: str) -> Iterator[Path]:
    """A local folder to write `location`'s files into: the folder itself when local (removed again
    if the block fails and the folder was new), else a temporary one uploaded to `location` when
    the block ends without an error."""
    if not is_remote(location):
        path = Path(normalize(location))
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
        except BaseException:
            if created:  # nothing half-written stays behind where the block failed
                shutil.rmtree(path, ignore_errors=True)
            raise
        return
    with tempfile.TemporaryDirectory(prefix="gptforge-stage-") as tmp:
        yield Path(tmp)
        upload_folder(tmp, location)


def check_writable(location: str, what: str = "storage") -> None:
    """Write and delete a small object at `location`: fails early, naming `what` and the error,
    when the bucket does not exist or the credentials do not allow writing."""
    probe = join(location, f".gptforge-probe-{uuid.uuid4().hex[:12]}")
    try:
        write_bytes(probe, b"probe")
        fs, path = resolve(probe)
        _call(probe, lambda: fs.delete_file(path))
    except (StorageError, OSError) as error:
        raise StorageError(f"{what}={location}: cannot write there ({error})") from None


def _call(location: str, work):
    """Run a pyarrow.fs call; its error becomes a StorageError naming the location (and the bucket)."""
    try:
        return work()
    except FileNotFoundError:
        raise
    except OSError as error:
        raise StorageError(f"storage {location!r}: {_first_line(error)}") from None

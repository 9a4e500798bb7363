"""Workdir file access for local paths and remote URLs (gs://, s3://, ...) alike.

Local paths go through `os` / `open` / `shutil` exactly as before; a path with a scheme
('gs://bucket/dir') goes through `etils.epath`, which uses TensorFlow's gfile when TensorFlow is
installed and fsspec otherwise (gs:// then needs `pip install gcsfs`, s3:// `s3fs`).

Object stores differ from a POSIX file system: folders exist only while they hold files, an
object written is visible only once it is closed (whole), and nothing can be appended to. So
remote writes here are whole-file writes, never appends or renames of a temporary file; log
files that grow are staged locally and copied (see qtransformers.train.writers).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]

_MISSING_BACKEND = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs"}


def is_remote(path: PathLike) -> bool:
    """True for a URL with a scheme other than file:// (gs://bucket/dir, s3://...)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def absolute(path: PathLike) -> str:
    """os.path.abspath for a local path; a remote URL unchanged (abspath would turn
    'gs://b/x' into '<cwd>/gs:/b/x', a local folder)."""
    text = os.fspath(path)
    return text if is_remote(text) else os.path.abspath(text)


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path` (a pathlib-like object that also understands gs:// and s3://)."""
    return epath.Path(path)


def _remote_call(fn, path: PathLike, *args, **kwargs):
    """Runs an epath operation on a remote path; names the missing fsspec package on
    ImportError (without TensorFlow, epath reads gs:// through fsspec + gcsfs)."""
    try:
        return fn(*args, **kwargs)
    except ImportError as err:
        scheme = os.fspath(path).split("://", 1)[0]
        package = _MISSING_BACKEND.get(scheme, f"the fsspec implementation for {scheme}://")
        raise ImportError(f"{os.fspath(path)!r} is a {scheme}:// path; reading and writing it "
                          f"needs `pip install {package}` (or TensorFlow, whose gfile epath "
                          f"uses when installed): {err}") from err


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a missing parent package ('google.cloud')
        return False


def remote_support_problem(path: PathLike) -> str | None:
    """None when `path` is local or its storage can be used here, else what to install.

    gs:// needs gcsfs (epath's fsspec backend; TensorFlow's gfile also works) and
    google-cloud-storage (orbax asks the bucket whether it has a hierarchical namespace).
    """
    if not is_remote(path):
        return None
    scheme = os.fspath(path).split("://", 1)[0]
    missing = []
    if scheme in _MISSING_BACKEND and not _importable("tensorflow"):
        if not _importable(_MISSING_BACKEND[scheme]):
            missing.append(_MISSING_BACKEND[scheme])
    if scheme == "gs" and not _importable("google.cloud.storage"):
        missing.append("google-cloud-storage")
    if not missing:
        return None
    return (f"{os.fspath(path)!r} is a {scheme}:// path, which needs "
            f"`pip install {' '.join(missing)}`" + (" (or `pip install 'qtransformers[gcs]'`)"
                                                     if scheme == "gs" else "") + " on every host.")


def check_remote_support(path: PathLike) -> None:
    """Raises ValueError naming the packages to install when `path`'s storage is unusable."""
    problem = remote_support_problem(path)
    if problem:
        raise ValueError(problem)


def makedirs(path: PathLike) -> None:
    """Creates a folder and its parents (exist_ok); a no-op for most object stores."""
    if is_remote(path):
        p = as_path(path)
        _remote_call(p.mkdir, path, parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def exists(path: PathLike) -> bool:
    """True when a file or folder exists at `path`."""
    if is_remote(path):
        return bool(_remote_call(as_path(path).exists, path))
    return os.path.exists(path)


def isfile(path: PathLike) -> bool:
    """True when `path` is a file."""
    if is_remote(path):
        return bool(_remote_call(as_path(path).is_file, path))
    return os.path.isfile(path)


def isdir(path: PathLike) -> bool:
    """True when `path` is a folder (remote: a prefix that holds objects)."""
    if is_remote(path):
        return bool(_remote_call(as_path(path).is_dir, path))
    return os.path.isdir(path)


def read_bytes(path: PathLike) -> bytes:
    """The whole content of a file."""
    if is_remote(path):
        return _remote_call(as_path(path).read_bytes, path)
    with open(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    """The whole content of a UTF-8 text file."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes a whole file so that a reader never sees it half-written.

    Local: a temporary file in the same folder, then os.replace (atomic). Remote: one object
    write (object stores publish an object only when it is complete; a temporary name and a
    rename would instead be a copy and a race between processes writing the same file).
    """
    if is_remote(path):
        p = as_path(path)
        _remote_call(p.write_bytes, path, data)
        return
    tmp = os.fspath(path) + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: PathLike, text: str) -> None:
    """Writes a whole UTF-8 text file (see write_bytes)."""
    write_bytes(path, text.encode("utf-8"))


def copy_to(local_file: PathLike, destination: PathLike) -> None:
    """Copies a local file to a local or remote destination (whole-file write)."""
    with open(local_file, "rb") as f:
        data = f.read()
    if is_remote(destination):
        write_bytes(destination, data)
    else:
        shutil.copyfile(local_file, destination)


def move(source: PathLike, destination: PathLike) -> None:
    """Moves a file or folder. Local: shutil.move. Remote: epath rename (a copy of every object
    plus a delete on object stores); the destination's parent must exist, which on object stores
    means it must hold at least one object."""
    if not (is_remote(source) or is_remote(destination)):
        shutil.move(os.fspath(source), os.fspath(destination))
        return
    src = as_path(source)
    _remote_call(src.rename, source, as_path(destination))


def _jsonable(value):
    """json.dump's fallback: NumPy / JAX arrays and scalars as lists / numbers, else str."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def read_json(path: PathLike):
    """The JSON value stored at `path`."""
    return json.loads(read_text(path))


def write_json(path: PathLike, value) -> None:
    """Writes `value` as JSON (arrays as lists) whole: a local file through a temporary file and
    a rename, so a killed run never leaves a half-written record; a remote one in one write."""
    text = json.dumps(value, indent=1, default=_jsonable)
    if is_remote(path):
        write_text(path, text)
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)

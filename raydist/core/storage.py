"""Where stages write: a local path or a URI (``s3://``, ``gs://``, ``hdfs://``, any pyarrow filesystem) that every
node of a cluster reaches. No Ray here.

Filesystems come from ``pyarrow.fs.FileSystem.from_uri`` (the library Ray Train and Ray Data use for the same
URIs), so a URI's query string configures it: ``s3://bucket/runs?endpoint_override=http://127.0.0.1:9000``
(S3 credentials from the usual AWS variables; ``AWS_ENDPOINT_URL`` also works).

Stages keep working on local files: a :class:`Mirror` is a local directory that stands for a remote one,
``pull``-ed before reading what another process wrote and ``push``-ed after writing. With a local location the
mirror *is* the location and both calls do nothing, so local runs behave exactly as before.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Union


class StorageError(ValueError):
    """A location cannot be opened or reached; the message names it."""


MANIFEST = "raydist.json"  # an artifact is complete when this file exists (pushed last)
_COMPLETE = ".raydist-complete"


def is_uri(location: Union[str, Path, None]) -> bool:
    """Whether ``location`` names a remote filesystem (``scheme://...``; ``file://`` counts as local)."""
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


def _split(uri: str) -> tuple[str, str]:
    base, _, query = uri.partition("?")
    return base.rstrip("/"), query


def join(location: Union[str, Path], *parts: str) -> Union[str, Path]:
    """``location / parts`` for a path or a URI (a URI's query string stays at the end)."""
    if not is_uri(location):
        return Path(location).joinpath(*parts)
    base, query = _split(str(location))
    path = "/".join([base, *[p.strip("/") for p in parts if p]])
    return f"{path}?{query}" if query else path


def name_of(location: Union[str, Path]) -> str:
    """The last component of a path or URI."""
    return _split(str(location))[0].rsplit("/", 1)[-1] if is_uri(location) else Path(location).name


def parent_of(location: Union[str, Path]) -> Union[str, Path]:
    """The parent of a path or URI."""
    if not is_uri(location):
        return Path(location).parent
    base, query = _split(str(location))
    parent = base.rsplit("/", 1)[0]
    return f"{parent}?{query}" if query else parent


def filesystem(location: Union[str, Path]):
    """``(pyarrow filesystem, path inside it)`` for a path or URI.

    Raises:
        ValueError: the URI's scheme or options are not understood (pyarrow's message).
    """
    import pyarrow.fs as pafs

    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(str(location).removeprefix("file://")).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError with a useful text
        raise StorageError(f"cannot open storage {location!r}: {e}") from None


def _info(location: Union[str, Path], selector=None):
    """``get_file_info`` of a location (or of a selector inside it), unreachable storage named in the error."""
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path if selector is None else selector(path))
    except OSError as e:  # unreachable endpoint, no permission, unknown bucket ...
        raise StorageError(f"cannot reach {location!s}: {e}") from None


def exists(location: Union[str, Path]) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type != pafs.FileType.NotFound


def is_file(location: Union[str, Path]) -> bool:
    import pyarrow.fs as pafs

    return _info(location).type == pafs.FileType.File


def has_files(location: Union[str, Path]) -> bool:
    """Whether ``location`` is a directory holding at least one file (object stores have no empty dirs)."""
    import pyarrow.fs as pafs

    if _info(location).type != pafs.FileType.Directory:
        return False
    listing = _info(location, lambda path: pafs.FileSelector(path, recursive=True))
    return any(i.type == pafs.FileType.File for i in listing)


def read_text(location: Union[str, Path]) -> str:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: Union[str, Path], text: str) -> None:
    """Write a whole file (atomically: a local file via rename, an object by its single PUT)."""
    if not is_uri(location):
        p = Path(location)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, p)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def upload(local: Union[str, Path], location: Union[str, Path], *, last: Optional[str] = MANIFEST) -> None:
    """Copy a local file or directory tree to ``location``; the file named ``last`` (the manifest) goes after
    everything else, so a reader that sees it sees a complete directory."""
    import pyarrow.fs as pafs

    local = Path(local)
    fs, dest = filesystem(location)
    lfs = pafs.LocalFileSystem()
    if local.is_file():
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local), dest, source_filesystem=lfs, destination_filesystem=fs)
        return
    files = sorted(p for p in local.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: the manifest(s) last
    for p in files:
        target = f"{dest}/{p.relative_to(local).as_posix()}"
        fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(p), target, source_filesystem=lfs, destination_filesystem=fs)


def download(location: Union[str, Path], local: Union[str, Path]) -> Path:
    """Copy a remote file or directory tree to ``local`` (replacing what is there)."""
    import pyarrow.fs as pafs

    fs, src = filesystem(location)
    local = Path(local)
    info = fs.get_file_info(src)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{location} does not exist")
    lfs = pafs.LocalFileSystem()
    if info.type == pafs.FileType.File:
        local.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(src, str(local), source_filesystem=fs, destination_filesystem=lfs)
        return local
    if local.exists():
        shutil.rmtree(local)
    local.mkdir(parents=True)
    pafs.copy_files(src, str(local), source_filesystem=fs, destination_filesystem=lfs)
    return local


def delete(location: Union[str, Path]) -> None:
    """Remove a file or directory tree (no error when absent)."""
    if not is_uri(location):
        p = Path(location)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


# What a process needs to reach the same storage as the driver (credentials, endpoints, the cache location).
STORAGE_ENV_VARS = (
    "RAYDIST_CACHE",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
)


_RAY_WORKING_DIR = re.compile(r"/runtime_resources/working_dir_files/(_ray_pkg_[0-9a-f]+)(?:/(.*))?$")


def on_this_node(path: str) -> str:
    """``path`` inside *this* node's copy of a Ray job's working_dir when it names a file in another node's copy.

    `raydist submit` ships small local models in the job's working_dir; the job's driver (on the head) makes
    their paths absolute, so they point into the head's unpacked copy. Every node unpacks the same package
    (``_ray_pkg_<content hash>``) in its own temp dir, and Ray puts that directory on each worker's
    PYTHONPATH, which is where the same file is found here. Any other path is returned unchanged.
    """
    m = _RAY_WORKING_DIR.search(str(path))
    if not m or os.path.exists(path):
        return path
    for entry in [*os.environ.get("PYTHONPATH", "").split(os.pathsep), *sys.path]:
        if entry.rstrip("/").endswith("/" + m.group(1)):
            candidate = os.path.join(entry, m.group(2) or "")
            if os.path.exists(candidate):
                return candidate
    return path


def storage_env() -> dict[str, str]:
    """The ``STORAGE_ENV_VARS`` set here: forwarded to workers, trials and replicas the driver starts."""
    return {k: os.environ[k] for k in STORAGE_ENV_VARS if os.environ.get(k)}


def cache_root() -> Path:
    """Where remote things are mirrored on this machine (``RAYDIST_CACHE`` or ``~/.cache/raydist``)."""
    return Path(os.environ.get("RAYDIST_CACHE", Path.home() / ".cache" / "raydist")).expanduser()


def _key(location: str) -> str:
    return hashlib.sha256(location.encode()).hexdigest()[:16]


def local_copy(location: Union[str, Path]) -> Path:
    """A local directory with the contents of ``location`` (itself when local; for a URI a cached download).

    Meant for what is immutable once complete (artifacts, a student's initial weights, a tokenizer): the copy
    is reused while the same URI is asked for again.
    """
    if not is_uri(location):
        return Path(location).expanduser()
    dest = cache_root() / "downloads" / f"{_key(str(location))}-{name_of(location)}"
    if (dest / _COMPLETE).is_file():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=_mkdir(dest.parent)))
    download(location, tmp / "d")
    (tmp / "d" / _COMPLETE).write_text(str(location))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp / "d", dest)
    shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


class Mirror:
    """A directory at ``location`` (path or URI) and the local directory this process works in.

    Args:
        location: where the directory lives for every node.
        role: tells apart processes of one machine mirroring the same location (``driver``, ``rank0`` ...).
    """

    def __init__(self, location: Union[str, Path], role: str = "driver"):
        self.remote = is_uri(location)
        self.location: Union[str, Path] = location if self.remote else Path(location).expanduser().resolve()
        self.local: Path = (
            cache_root() / "mirror" / f"{_key(str(location))}-{name_of(location)}" / role
            if self.remote
            else self.location
        )
        if self.remote:  # a local directory is created by whoever first writes into it
            self.local.mkdir(parents=True, exist_ok=True)

    def at(self, *parts: str) -> Union[str, Path]:
        """The location of a file inside (a URI for a remote directory)."""
        return join(self.location, *parts)

    @property
    def name(self) -> str:
        return name_of(self.location)

    def exists(self, rel: str) -> bool:
        return exists(self.at(rel)) if self.remote else (self.local / rel).exists()

    def pull(self, rel: str) -> Path:
        """Refresh ``local/rel`` from the location (when remote and present there); returns the local path."""
        if self.remote and exists(self.at(rel)):
            download(self.at(rel), self.local / rel)
        return self.local / rel

    def push(self, rel: str, last: Optional[str] = MANIFEST) -> None:
        """Copy ``local/rel`` (a file or directory; the file named ``last`` after the rest) to the location
        (when remote)."""
        if self.remote and (self.local / rel).exists():
            upload(self.local / rel, self.at(rel), last=last)

    def __repr__(self) -> str:
        return f"Mirror({self.location!s})"

"""Folders on local disk or in object storage (`s3://`, `gs://`, any fsspec URL), with the few operations
the pipeline needs: whole-object reads and atomic writes, ranged reads, uploads and downloads.

Writes are atomic for readers: a local file is written to a temp name and renamed; an object store
PUT is atomic by itself. Object storage needs the filesystem's fsspec package (s3fs, gcsfs) and its
usual credentials (AWS_* / AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from safetensors.torch import save_file

from quantizer.errors import ConfigError


def is_url(name: str) -> bool:
    """`s3://…`, `gs://…`, … (a Windows-less world: anything with a scheme)."""
    return "://" in str(name)


def _filesystem(url: str):
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as exc:  # s3fs / gcsfs missing
        scheme = url.partition("://")[0]
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme, f"the fsspec package for {scheme}://")
        raise ConfigError(f"{url}: reading and writing {scheme}:// needs {package} (pip install {package})") from exc
    except ValueError as exc:
        raise ConfigError(f"{url}: {exc}") from exc


class Location:
    """A folder: a local directory (`url` is its absolute path) or an object-store prefix (`url` is the URL)."""

    def __init__(self, url: str | Path) -> None:
        url = str(url)
        self.is_local = not is_url(url) or url.startswith("file://")
        if self.is_local:
            self.url = str(Path(url.removeprefix("file://")).absolute())
            self.fs, self.root = None, self.url
        else:
            self.url = url.rstrip("/")
            self.fs, self.root = _filesystem(self.url)
            self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return self.url

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def child(self, name: str) -> "Location":
        return Location(f"{self.url}/{name}")

    def path(self, name: str = "") -> str:
        """The filesystem path (local) or bucket path (remote) of `name` inside this folder."""
        return f"{self.root}/{name}" if name else self.root

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rpartition("/")[2]

    # ---- queries ----------------------------------------------------------------------------------
    def exists(self) -> bool:
        """The folder exists (local) or holds at least one object (remote)."""
        if self.is_local:
            return Path(self.root).exists()
        return bool(self.fs.exists(self.root)) and bool(self.fs.find(self.root, maxdepth=None, withdirs=False))

    def is_file(self, name: str) -> bool:
        return Path(self.path(name)).is_file() if self.is_local else bool(self.fs.isfile(self.path(name)))

    def size(self, name: str) -> int:
        return Path(self.path(name)).stat().st_size if self.is_local else int(self.fs.size(self.path(name)))

    def list(self, prefix: str = "") -> list[str]:
        """Names of the files directly in this folder that start with `prefix`, sorted."""
        if self.is_local:
            root = Path(self.root)
            return sorted(p.name for p in root.iterdir() if p.is_file() and p.name.startswith(prefix)) \
                if root.is_dir() else []
        if not self.fs.exists(self.root):
            return []
        names = [p.rstrip("/").rpartition("/")[2] for p in self.fs.ls(self.root, detail=False, refresh=True)]
        return sorted(n for n in names if n.startswith(prefix) and self.fs.isfile(self.path(n)))

    # ---- reads ------------------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        if self.is_local:
            return Path(self.path(name)).read_bytes()
        return self.fs.cat_file(self.path(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode()

    def read_range(self, name: str, start: int, length: int) -> bytes:
        if self.is_local:
            with open(self.path(name), "rb") as f:
                f.seek(start)
                return f.read(length)
        return self.fs.cat_file(self.path(name), start=start, end=start + length)

    def download(self, name: str, target: Path) -> Path:
        """Copy `name` to the local file `target` (temp name, then rename); returns target."""
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        if self.is_local:
            shutil.copyfile(self.path(name), tmp)
        else:
            self.fs.get_file(self.path(name), str(tmp))
        os.replace(tmp, target)
        return target

    # ---- writes -----------------------------------------------------------------------------------
    def makedirs(self) -> None:
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """`data` as file `name`, atomically: local, through `writing`; object storage, one PUT of the bytes."""
        if self.is_local:
            with self.writing(name) as tmp:
                Path(tmp).write_bytes(data)
        else:
            self.fs.pipe_file(self.path(name), data)

    @contextlib.contextmanager
    def writing(self, name: str) -> Iterator[str]:
        """A temp file's path to write file `name` into; when the block ends, the file takes its place whole —
        local: renamed (the temp file sits in this folder), object storage: uploaded in one piece — so a reader
        never sees a part of it. The temp file is removed in any case."""
        if self.is_local:
            self.makedirs()
        fd, tmp = tempfile.mkstemp(prefix=f".{name}." if self.is_local else f"rayquant-{name}.", suffix=".tmp",
                                   dir=self.root if self.is_local else None)
        os.close(fd)
        try:
            yield tmp
            if self.is_local:
                os.replace(tmp, self.path(name))
            else:
                self.upload(Path(tmp), name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def write_tensors(self, name: str, tensors: dict, metadata: dict[str, str]) -> None:
        """A safetensors file, atomically (`writing`), written straight from the tensors (no serialized copy in
        memory: a 671B MoE layer's packed tensors are 6 GB)."""
        with self.writing(name) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """Write `name` only if it does not exist yet; False if it did. Local: O_EXCL. Object stores: a
        conditional PUT where the filesystem offers one (S3 If-None-Match), else write and read back."""
        if self.is_local:
            self.makedirs()
            try:
                fd = os.open(self.path(name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if self.is_file(name):
            return False
        try:
            self.fs.pipe_file(self.path(name), data, mode="create")
        except FileExistsError:
            return False
        except (TypeError, NotImplementedError, ValueError):
            self.fs.pipe_file(self.path(name), data)
        return self.read_bytes(name) == data

    def upload(self, source: Path, name: str) -> None:
        """Copy the local file `source` in as `name` (local: temp name, then rename)."""
        if self.is_local:
            self.makedirs()
            tmp = self.path(f".{name}.{os.getpid()}.tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, self.path(name))
        else:
            self.fs.put_file(str(source), self.path(name))

    def remove(self, name: str) -> None:
        if self.is_local:
            Path(self.path(name)).unlink(missing_ok=True)
        elif self.fs.exists(self.path(name)):
            self.fs.rm_file(self.path(name))

    def remove_tree(self) -> None:
        """Delete this folder and everything in it."""
        if self.is_local:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def local_copy(url: str, cache: Path) -> Path:
    """A local path for the file `url`: the path itself, or a download into `cache` (reused when the size
    still matches)."""
    if not is_url(url) or url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    folder, _, name = url.rpartition("/")
    location = Location(folder)
    if not location.is_file(name):
        raise ConfigError(f"{url} does not exist (or these credentials cannot read it)")
    target = cache / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if not (target.is_file() and target.stat().st_size == location.size(name)):
        location.download(name, target)
    return target

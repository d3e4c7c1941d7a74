"""Where a model's files come from: a local dir, the Hugging Face Hub (`org/name[@revision]`), or object
storage (`s3://…`, `gs://…`).

The driver resolves a name once into a `ModelRef` (a Hub revision becomes its commit hash, so every stage
reads the same files) and hands that to the stage actors, which open it again. A source gives config and
tokenizer files, each shard's safetensors header (read with ranged requests, never the whole shard) and,
when a stage asks, the shards themselves: a stage downloads only the shards that hold its tensors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from quantizer.errors import ConfigError
from quantizer.storage import Location, is_url

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
META_FILES = ("config.json", INDEX_FILE, *TOKENIZER_FILES)  # small files every process may read
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
MAX_HEADER_BYTES = 100 * 1024**2

Header = dict[str, tuple[tuple[int, ...], str]]  # tensor name → (shape, safetensors dtype)


def parse_header(read: Callable[[int, int], bytes], where: str) -> tuple[Header, bytes]:
    """A safetensors header (u64 length + JSON) through `read(start, length)`; returns it and its raw bytes."""
    try:
        length = struct.unpack("<Q", read(0, 8))[0]
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"header length {length} is implausible")
        raw = read(8, length)
        header = json.loads(raw)
        return {k: (tuple(v["shape"]), v["dtype"]) for k, v in header.items() if k != "__metadata__"}, raw
    except (OSError, ValueError, KeyError, struct.error, TypeError) as exc:
        raise ConfigError(f"shard {where} is unreadable ({exc}); re-download or re-convert it") from exc


def _shards_from_index(read_index: Callable[[], str], where: str) -> list[str]:
    try:
        return sorted(set(json.loads(read_index())["weight_map"].values()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{where}/{INDEX_FILE} is not a valid safetensors index ({exc})") from exc


class ModelSource:
    """The files of one checkpoint. Subclasses say where they live."""

    description: str

    def meta_dir(self) -> Path:
        """A local folder holding config.json and the tokenizer files (and the index, if any)."""
        raise NotImplementedError

    def shard_files(self) -> list[str]:
        raise NotImplementedError

    def header(self, shard: str) -> Header:
        raise NotImplementedError

    def fetch(self, shard: str) -> Path:
        """A local path of the whole shard (downloaded on first use)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What makes these files these files: for a resume hash and the job report."""
        raise NotImplementedError


class LocalSource(ModelSource):
    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self.description = str(self.model_dir)
        if not self.model_dir.is_dir():
            raise ConfigError(f"model directory {self.model_dir} does not exist; pass a Hugging Face checkpoint dir, "
                              "a Hub id (org/name[@revision]) or an s3:// / gs:// URL")
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError(f"{self.model_dir} has no config.json; is it a Hugging Face checkpoint dir?")
        self._raw_headers: dict[str, bytes] = {}

    def meta_dir(self) -> Path:
        return self.model_dir

    def shard_files(self) -> list[str]:
        if (self.model_dir / INDEX_FILE).is_file():
            return _shards_from_index((self.model_dir / INDEX_FILE).read_text, str(self.model_dir))
        if (self.model_dir / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        raise ConfigError(f"{self.model_dir} has no {SINGLE_FILE} or {INDEX_FILE}")

    def header(self, shard: str) -> Header:
        path = self.fetch(shard)

        def read(start: int, length: int) -> bytes:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)

        header, self._raw_headers[shard] = parse_header(read, str(path))
        return header

    def fetch(self, shard: str) -> Path:
        path = self.model_dir / shard
        if not path.is_file():
            raise ConfigError(f"shard {path} is listed in the index but missing; re-download the checkpoint")
        return path

    def identity(self) -> dict[str, Any]:
        """File sizes and header hashes: a re-converted or re-downloaded checkpoint with other weights has
        other headers or sizes almost surely, and this costs no read of the weights."""
        shards = {}
        for shard in self.shard_files():
            if shard not in self._raw_headers:
                self.header(shard)
            shards[shard] = [self.fetch(shard).stat().st_size, hashlib.sha256(self._raw_headers[shard]).hexdigest()]
        return {"kind": "local", "path": str(self.model_dir.resolve()), "shards": shards}


class RemoteSource(ModelSource):
    """A checkpoint folder in object storage; meta files and fetched shards are kept in `cache`."""

    def __init__(self, url: str, cache: Path) -> None:
        self.location = Location(url)
        self.description = self.location.url
        self.cache = cache / hashlib.sha256(self.location.url.encode()).hexdigest()[:16]
        if not self.location.is_file("config.json"):
            raise ConfigError(f"{url} has no config.json (or these credentials cannot read it); point --model "
                              "at the folder of a Hugging Face checkpoint")
        self._raw_headers: dict[str, bytes] = {}

    @functools.cache
    def meta_dir(self) -> Path:
        target = self.cache / "meta"
        for name in META_FILES:
            if self.location.is_file(name):
                self.location.download(name, target / name)
        return target

    def shard_files(self) -> list[str]:
        if (self.meta_dir() / INDEX_FILE).is_file():
            return _shards_from_index((self.meta_dir() / INDEX_FILE).read_text, self.location.url)
        if self.location.is_file(SINGLE_FILE):
            return [SINGLE_FILE]
        raise ConfigError(f"{self.location.url} has no {SINGLE_FILE} or {INDEX_FILE}")

    def header(self, shard: str) -> Header:
        if not self.location.is_file(shard):
            raise ConfigError(f"shard {self.location.url}/{shard} is listed in the index but missing; upload it again")
        header, self._raw_headers[shard] = parse_header(
            lambda start, length: self.location.read_range(shard, start, length), f"{self.location.url}/{shard}")
        return header

    def fetch(self, shard: str) -> Path:
        target = self.cache / "shards" / shard
        size = self.location.size(shard)
        if not (target.is_file() and target.stat().st_size == size):
            log.info("downloading %s/%s (%.2f GB)", self.location.url, shard, size / 1024**3)
            self.location.download(shard, target)
        return target

    def identity(self) -> dict[str, Any]:
        shards = {}
        for shard in self.shard_files():
            if shard not in self._raw_headers:
                self.header(shard)
            shards[shard] = [self.location.size(shard), hashlib.sha256(self._raw_headers[shard]).hexdigest()]
        return {"kind": "remote", "url": self.location.url, "shards": shards}


class HubSource(ModelSource):
    """A Hub repo at one commit. Online, files go through huggingface_hub's cache (hf_hub_download) and
    headers come from its ranged-request metadata call; offline (HF_HUB_OFFLINE=1) the cached snapshot
    folder is read as a local checkpoint."""

    def __init__(self, repo_id: str, commit: str) -> None:
        from huggingface_hub import constants

        self.repo_id, self.commit = repo_id, commit
        self.description = f"{repo_id}@{commit}"
        self.offline = constants.is_offline_mode()
        self._local = LocalSource(_cached_snapshot(repo_id, commit)) if self.offline else None

    @functools.cache
    def _repo_files(self) -> frozenset[str]:
        from huggingface_hub import HfApi

        return frozenset(_hub_call(lambda: HfApi().list_repo_files(self.repo_id, revision=self.commit), self.repo_id))

    def _download(self, name: str) -> Path:
        from huggingface_hub import hf_hub_download

        return Path(_hub_call(lambda: hf_hub_download(self.repo_id, name, revision=self.commit), self.repo_id))

    @functools.cache
    def meta_dir(self) -> Path:
        if self._local:
            return self._local.meta_dir()
        paths = [self._download(name) for name in META_FILES if name in self._repo_files()]
        if not paths or paths[0].name != "config.json":
            raise ConfigError(f"Hub repo {self.repo_id} has no config.json at {self.commit}; is it a model repo?")
        return paths[0].parent  # every file of a commit lands in the same snapshot folder

    def shard_files(self) -> list[str]:
        if self._local:
            return self._local.shard_files()
        if INDEX_FILE in self._repo_files():
            return _shards_from_index((self.meta_dir() / INDEX_FILE).read_text, self.repo_id)
        if SINGLE_FILE in self._repo_files():
            return [SINGLE_FILE]
        raise ConfigError(f"Hub repo {self.repo_id} has no safetensors weights at {self.commit}")

    @functools.cache
    def _metadata(self) -> dict[str, Header]:
        from huggingface_hub import HfApi

        meta = _hub_call(lambda: HfApi().get_safetensors_metadata(self.repo_id, revision=self.commit), self.repo_id)
        return {file: {name: (tuple(t.shape), t.dtype) for name, t in m.tensors.items()}
                for file, m in meta.files_metadata.items()}

    def header(self, shard: str) -> Header:
        if self._local:
            return self._local.header(shard)
        return self._metadata()[shard]

    def fetch(self, shard: str) -> Path:
        return self._local.fetch(shard) if self._local else self._download(shard)

    def identity(self) -> dict[str, Any]:
        return {"kind": "hub", "repo": self.repo_id, "commit": self.commit}


def _hub_call(call: Callable[[], Any], repo_id: str) -> Any:
    """Run a huggingface_hub call; its errors become one line that names the problem and the fix."""
    from huggingface_hub import errors

    try:
        return call()
    except errors.GatedRepoError as exc:
        raise ConfigError(f"Hub repo {repo_id} is gated: accept its terms on the Hub and log in (hf auth login or "
                          "HF_TOKEN)") from exc
    except errors.RepositoryNotFoundError as exc:
        raise ConfigError(f"Hub repo {repo_id} does not exist or is private (log in with HF_TOKEN)") from exc
    except errors.RevisionNotFoundError as exc:
        raise ConfigError(f"Hub repo {repo_id} has no such revision ({exc})") from exc
    except (errors.HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"could not reach the Hub for {repo_id} ({exc}); with the files already in the local HF "
                          "cache, set HF_HUB_OFFLINE=1") from exc


def _cached_snapshot(repo_id: str, commit: str) -> Path:
    from huggingface_hub import constants

    snapshot = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit
    if not (snapshot / "config.json").is_file():
        raise ConfigError(f"{repo_id}@{commit} is not in the local HF cache ({constants.HF_HUB_CACHE}) and "
                          "HF_HUB_OFFLINE=1 forbids downloading it: download it first (hf download "
                          f"{repo_id}) or unset HF_HUB_OFFLINE")
    return snapshot


def resolve_hub_commit(repo_id: str, revision: str | None) -> str:
    """The commit hash of `revision` (default main): from the Hub, or offline from the cache's refs."""
    from huggingface_hub import HfApi, constants

    revision = revision or "main"
    if not constants.is_offline_mode():
        return _hub_call(lambda: HfApi().model_info(repo_id, revision=revision).sha, repo_id)
    repo_cache = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    ref = repo_cache / "refs" / revision
    if not ref.is_file():
        raise ConfigError(f"{repo_id}@{revision} is not in the local HF cache ({constants.HF_HUB_CACHE}) and "
                          f"HF_HUB_OFFLINE=1 forbids asking the Hub: download it first (hf download {repo_id}"
                          f"{'' if revision == 'main' else ' --revision ' + revision}) or unset HF_HUB_OFFLINE")
    return ref.read_text().strip()


@dataclass(frozen=True)
class ModelRef:
    """A model as the driver resolved it; stage actors `open()` the same files from it."""

    kind: str  # "local" (an absolute dir), "hub" (a repo id at a commit) or "remote" (an object-store URL)
    location: str
    revision: str | None = None  # the Hub commit hash

    def open(self, cache: Path | None = None) -> ModelSource:
        if self.kind == "local":
            return LocalSource(Path(self.location))
        if self.kind == "hub":
            return HubSource(self.location, self.revision or "main")
        from quantizer.assets import cache_dir

        return RemoteSource(self.location, cache or cache_dir() / "remote")

    def __str__(self) -> str:
        return f"{self.location}@{self.revision}" if self.kind == "hub" else self.location


def resolve_model(name: str, default_dir: Callable[[], Path]) -> ModelRef:
    """A model name as users write it → ModelRef. A local folder wins over a Hub id of the same spelling."""
    name = str(name)
    if name == "default":
        return ModelRef("local", str(default_dir().resolve()))
    if is_url(name) and not name.startswith("file://"):
        return ModelRef("remote", Location(name).url)
    path = Path(name.removeprefix("file://")).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        return ModelRef("local", str(path.resolve()))
    repo_id, _, revision = name.partition("@")
    commit = resolve_hub_commit(repo_id, revision or None)
    log.info("model %s resolved to commit %s", name, commit)
    return ModelRef("hub", repo_id, commit)

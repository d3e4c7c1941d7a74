"""Where a job's checkpoint goes, and where the state lives that lets an unfinished job resume.

Local output `DIR`: the checkpoint is assembled in `.DIR.partial` beside it and renamed into place at the
end; the resume state (finished layers, settings stamp, lock) lives in `.DIR.rayquant-work` beside it.

Object storage `s3://bucket/prefix` (or gs://…): there is no rename, so the stages write their shards in
place, the driver then writes the index, config and tokenizer files, and `.rayquant-complete.json` last —
a checkpoint without that marker is unfinished. The resume state lives under `prefix/.rayquant-work/`, so
a job restarted on another cluster resumes from it.

Only a checkpoint that carries the marker counts as ours and may be replaced (--overwrite); nothing else
the user made is ever deleted. The resume state is removed only once the checkpoint is in place.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from quantizer.errors import ConfigError
from quantizer.storage import Location

log = logging.getLogger(__name__)

COMPLETE_MARKER = ".rayquant-complete.json"
WORK_DIR_NAME = ".rayquant-work"


class OutputTarget:
    """The final folder, the folder the checkpoint is assembled in, and the resume state's folder."""

    def __init__(self, output: str) -> None:
        self.final = Location(output)
        if self.final.is_local:
            path = Path(self.final.url)
            self.staging = Location(path.with_name(f".{path.name}.partial"))
            self.work = Location(path.with_name(f".{path.name}.rayquant-work"))
        else:
            self.staging = self.final
            self.work = self.final.child(WORK_DIR_NAME)

    def completed(self) -> dict[str, Any] | None:
        """The final folder's completion marker, if it holds a checkpoint rayquant finished."""
        if not self.final.is_file(COMPLETE_MARKER):
            return None
        try:
            return json.loads(self.final.read_text(COMPLETE_MARKER))
        except ValueError:
            return None

    def check(self, overwrite: bool) -> dict[str, Any] | None:
        """Refuse outputs we must not write; returns the marker of a finished checkpoint we may replace."""
        marker = self.completed()
        unfinished_here = not self.final.is_local and self.work.is_file("job.json")
        if marker is None and self.final.exists() and not unfinished_here:
            raise ConfigError(
                f"output {self.final} already exists and holds no checkpoint rayquant finished (no {COMPLETE_MARKER}); "
                "rayquant never deletes what it did not write: choose another --out, or remove it yourself "
                "(--overwrite replaces only rayquant checkpoints)")
        if marker is not None and not overwrite:
            raise ConfigError(f"output {self.final} already exists (a finished rayquant checkpoint); choose another "
                              "--out or pass --overwrite to replace it")
        return marker

    def prepare(self, replacing: dict[str, Any] | None) -> None:
        """Make the staging folder. In object storage a replaced checkpoint is unmarked first, so that it
        never looks finished while new shards overwrite it."""
        self.staging.makedirs()
        if replacing is not None and not self.final.is_local:
            self.final.remove(COMPLETE_MARKER)

    def publish(self, files: list[str], settings_hash: str, replacing: dict[str, Any] | None) -> None:
        """Put the assembled checkpoint in place and mark it finished."""
        marker = json.dumps({"files": files, "settings_hash": settings_hash, "finished": time.time()}, indent=2)
        if not self.final.is_local:
            if replacing is not None:  # files of the old checkpoint that the new one does not have
                for name in set(replacing.get("files", [])) - set(files):
                    self.final.remove(name)
            self.final.write_text(COMPLETE_MARKER, marker)
            return
        self.staging.write_text(COMPLETE_MARKER, marker)
        final = Path(self.final.url)
        old = None
        if final.exists():  # a finished rayquant checkpoint (check() refused anything else)
            old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
            os.replace(final, old)
        os.replace(self.staging.url, final)
        if old is not None:
            shutil.rmtree(old)

    def discard_unused(self, published: bool) -> None:
        """Local output: remove the work folder once the checkpoint is published, or when a run stopped before
        any layer finished (nothing to resume), and an empty staging folder. In object storage the work prefix
        is emptied by the driver after publishing, and kept otherwise."""
        if not self.final.is_local:
            return
        if published or not self.work.child("layers").list():
            self.work.remove_tree()
        staging = Path(self.staging.url)
        if not published and staging.is_dir() and not any(staging.iterdir()):
            staging.rmdir()

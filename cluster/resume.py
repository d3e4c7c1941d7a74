"""The resume state of an unfinished job: finished layers and a stamp of the settings they were made with.
The stamp's hash covers the settings, the model's identity and the calibration content, so a resume with
anything changed is refused instead of mixing two runs' layers."""

from __future__ import annotations

import json
from typing import Any

from quantizer.errors import ConfigError
from quantizer.layer_store import FolderLayerStore
from quantizer.storage import Location

STAMP_FILE = "job.json"


def layers_folder(work: Location) -> Location:
    return work.child("layers")


def open_work_dir(work: Location, settings_hash: str, restart: bool,
                  extra: dict[str, Any] | None = None) -> tuple[list[int], dict[str, Any]]:
    """Create or reopen the resume state in `work`; returns the layers already finished and the stamp
    (with `extra` recorded on a fresh start, kept on a resume)."""
    layers = layers_folder(work)
    if restart:
        layers.remove_tree()
        work.remove(STAMP_FILE)
    stamp: dict[str, Any] = {}
    if work.is_file(STAMP_FILE):
        stamp = json.loads(work.read_text(STAMP_FILE))
        previous = stamp.get("settings_hash")
        if previous != settings_hash:
            raise ConfigError(
                f"{work} holds an unfinished run with different settings, model files or calibration data (hash "
                f"{previous}, now {settings_hash}); rerun with the original ones to resume, or pass --restart to "
                "discard it")
    else:
        stamp = {"settings_hash": settings_hash, **(extra or {})}
        work.makedirs()
        work.write_text(STAMP_FILE, json.dumps(stamp))
    return FolderLayerStore(layers).done(), stamp


def remove_work_dir(work: Location, keep: tuple[str, ...] = ()) -> None:
    """Delete the resume state (the checkpoint is in place); files named in `keep` stay (the lock, which
    its owner removes)."""
    layers_folder(work).remove_tree()
    for name in work.list():
        if name not in keep:
            work.remove(name)

"""The work dir of an unfinished job: its settings hash guards a resume against changed settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from quantizer.errors import ConfigError
from quantizer.layer_store import DiskLayerStore

WORK_DIR_NAME = ".rayquant-work"


def open_work_dir(partial_dir: Path, settings_hash: str, restart: bool) -> tuple[Path, list[int]]:
    """Create or reopen `<partial>/.rayquant-work`; returns it and the layers already finished."""
    work = partial_dir / WORK_DIR_NAME
    stamp = work / "job.json"
    if restart and work.exists():
        shutil.rmtree(work)
    if stamp.is_file():
        previous = json.loads(stamp.read_text()).get("settings_hash")
        if previous != settings_hash:
            raise ConfigError(
                f"{partial_dir} holds an unfinished run with different settings (hash {previous}, now "
                f"{settings_hash}); rerun with the original settings to resume, or pass --restart to discard it"
            )
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"settings_hash": settings_hash}))
    return work, DiskLayerStore(work / "layers").done()

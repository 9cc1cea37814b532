"""The checkpoint folder: what an interrupted calibration needs to resume, kept beside OUT (`OUT.ckpt`)
or in `--checkpoint-dir`, which may be a folder the user keeps other files in.

Every entry mlakit writes there is named below, so that cleaning up after a finished run deletes
those and nothing else; the folder itself is removed only when mlakit created it (the CREATED
marker) and nothing else is left in it.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

from mlakit.core.errors import MlakitError
from mlakit.core.guard import writing

CREATED = ".mlakit-created"
STEPS = ("step-*", ".step-*.tmp")  # distillation checkpoints (distill.py)
CACHE = "teacher-topk"  # the cached teacher (teacher.py)
LAYERS = "layerwise-layers"  # finished layers of an unfinished layer-wise stage (layerwise.py)
STAGE = "layerwise-output"  # a finished layer-wise stage that `--mode both` distills from (run.py)
OWNED = (*STEPS, CACHE, LAYERS, STAGE, f".{STAGE}.tmp-*", f".{STAGE}.old-*", f".{STAGE}.lock")


def resume_hint(saved: str) -> None:
    """After Ctrl-C or SIGTERM, when progress was saved: say how to continue (the CLI's own line follows)."""
    print(f"{saved} kept: rerun with --resume to continue", file=sys.stderr)


def create(folder: Path) -> None:
    """Make the folder if it is missing, marked as mlakit's."""
    if not folder.exists():
        with writing(folder):
            folder.mkdir(parents=True)
            (folder / CREATED).touch()


def remove(folder: Path) -> None:
    """After a finished run: delete what mlakit wrote, and the folder if mlakit made it and nothing
    else is left in it."""
    if not folder.is_dir():
        return
    for pattern in OWNED:
        for path in folder.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    if (folder / CREATED).is_file():
        (folder / CREATED).unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()


def check_resume(folder: Path, saved: Iterable[tuple[Path, dict, dict]], resume: bool, force: bool) -> None:
    """Refuse to mix runs before anything is computed. `saved` holds, for each kind of progress found
    in `folder`, where it is, the fingerprint it was saved with and the one this run has: `--resume`
    needs some, all saved with this run's options; a fresh run does not start over progress it
    would discard unless `--force`."""
    saved = list(saved)
    if not resume:
        if saved and not force:
            raise MlakitError(f"{folder} holds checkpoints of an unfinished run: pass --resume to continue it, "
                              "or --force to start over")
        return
    if not saved:
        raise MlakitError(f"--resume: no complete checkpoint in {folder}; start without --resume")
    for where, old, new in saved:
        for key, value in new.items():
            if old.get(key) != value:
                raise MlakitError(
                    f"--resume: {where} was saved by a run with {key} {old.get(key)!r}, not {value!r}; "
                    "resume with the same options, or pass --force without --resume to start over"
                )

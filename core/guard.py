"""Checks that protect the user's files, and the atomic write of an output folder.

No torch or transformers here: the CLI runs these checks before loading anything heavy, so that
bad paths and numbers fail at once, and every stage calls the same rules.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mlakit.core.errors import MlakitError

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo"
# Folders a run writes beside OUT (.NAME.PART-XXXX); a killed run can leave them behind.
TEMP_PARTS = ("tmp", "old", "layerwise", "data", "exact", "pad")
# What marks a folder as written by convert or calibrate: only such a folder (or an empty one) is replaced.
RECORD = "mlakit.json"
# The errnos of a full disk or quota, and below how many free bytes a failed write is taken for one.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE_BYTES = 2**20
# The lock files (`.NAME.lock` beside OUT) this process holds.
_HELD: set[Path] = set()


def local_model(source: str) -> Path | None:
    """The folder SOURCE names on this machine (`demo` or a path), None for a hub id; refuse a
    missing path or a folder without config.json."""
    if source == "demo":
        return DEMO_DIR
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise MlakitError(f"{source}: no config.json in this folder; point at a Hugging Face model folder")
        return path
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise MlakitError(f"{source}: no such folder, and not a hub id of the form owner/name")
    return None


def record_id(source: str) -> str:
    """How a record names a source: a local folder by its absolute path (so that it is found again
    from any working folder), `demo` and hub ids as given."""
    folder = local_model(source)
    return str(folder.resolve()) if folder is not None and source != "demo" else source


def positive(option: str, value: int | None, what: str = "the value") -> None:
    """Refuse 0 and negatives for an option that has no meaning for them (None: not given)."""
    if value is not None and value < 1:
        raise MlakitError(f"{option} {value}: {what} must be positive")


def cache_share(value: str | None) -> float | None:
    """`--cache` as given, a fraction (0.25) or a percentage (25%), as a fraction; None: not given."""
    if value is None:
        return None
    text = value.strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise MlakitError(f"--cache {value}: give a share of the source's KV cache, e.g. 0.5 or 25%") from None
    return share  # its range is checked with the plan (convert.plan.cache_split)


def check_protected(target: Path, inputs: Iterable[Path | None], what: str = "OUT", nest_ok: bool = False) -> None:
    """Refuse a folder to be written that is, holds or lies inside a folder the run reads: replacing
    it would delete that input, or the input would change under the run. Symlinks are followed, so
    an alias is caught. `nest_ok` allows lying inside (validate keeps its report in CONVERTED)."""
    dest = target.expanduser().resolve()
    for folder in inputs:
        if folder is None:
            continue
        src = folder.expanduser().resolve()
        if dest == src:
            relation = "is"
        elif dest in src.parents:
            relation = "holds"
        elif src in dest.parents and not nest_ok:
            relation = "lies inside"
        else:
            continue
        raise MlakitError(f"{what} {target} {relation} {folder}, which this run reads; choose another {what}")


def check_output(out: Path, force: bool, protect: Iterable[Path | None] = (), marker: str = RECORD,
                 what: str = "OUT") -> None:
    """Fail early, before any work: OUT would replace an input, exists without --force, is not an
    output mlakit may replace (`check_replaceable`), or cannot be written."""
    check_protected(out, protect, what)
    if out.exists():
        if not force:
            raise MlakitError(f"{out} already exists; pass --force to replace it")
        check_replaceable(out, marker, what)
    if not out.parent.exists():
        raise MlakitError(f"{out.parent}: no such folder")
    if not os.access(out.parent, os.W_OK):
        raise MlakitError(f"{out.parent}: no write access")


def check_replaceable(out: Path, marker: str = RECORD, what: str = "OUT") -> None:
    """The one rule for replacing an existing output: only a folder that mlakit wrote (it holds
    `marker`) or an empty folder; a file or a folder of the user's is never deleted, --force or not."""
    if out.is_dir() and (marker in os.listdir(out) or not os.listdir(out)):
        return
    kind = "a file" if not out.is_dir() else f"a folder without {marker}"
    raise MlakitError(f"{out} is {kind}, not an output of mlakit, which replaces only its own outputs; choose "
                      f"another {what}, or move it away first")


def _lock_path(out: Path) -> Path:
    out = out.expanduser().resolve()
    return out.with_name(f".{out.name}.lock")


def _acquire(lock: Path, out: Path) -> int:
    """An open descriptor of `lock` holding its exclusive flock. A holder deletes the file before it lets
    go, so a descriptor whose file is gone (or replaced) meanwhile is dropped and the path opened again."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise disk_error(exc, lock) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise MlakitError(f"another mlakit run (process {holder}) is writing {out}; wait for it to finish or "
                              "choose another OUT") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd
        os.close(fd)


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside OUT for the block, so that two runs never write one OUT at once: the
    second one stops with one line. Re-entrant within a process; in a distributed launch only the
    main process (RANK 0), the one that writes OUT, takes it."""
    lock = _lock_path(out)
    if lock in _HELD or int(os.environ.get("RANK", "0")) > 0:
        yield
        return
    fd = _acquire(lock, out)
    _HELD.add(lock)
    try:
        yield
    finally:
        _HELD.discard(lock)
        lock.unlink(missing_ok=True)  # while still held, so that no other run holds a deleted file
        os.close(fd)


def stale_folders(out: Path) -> list[str]:
    """One warning per temporary folder beside OUT that a killed run left, with its size; they are
    not deleted, since another run may still be writing one."""
    out = out.expanduser().resolve()  # atomic_folder names its folders after the resolved OUT
    if not out.parent.is_dir():
        return []
    lines = []
    for part in TEMP_PARTS:
        for folder in sorted(out.parent.glob(f".{out.name}.{part}-*")):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
            lines.append(f"warning: {folder} ({size / 2**20:.1f} MiB) is left from an interrupted run, or another "
                         "run is writing it; delete it when no run is")
    return lines


def disk_error(exc: Exception, path: Path) -> MlakitError:
    """One line for a failed write. A full disk is named as such whichever layer noticed it: Python
    (ENOSPC), safetensors (in its message) or torch.save (a failed write, no space left where it wrote)."""
    full = getattr(exc, "errno", None) in DISK_FULL or "No space left" in str(exc)
    if full or _free_bytes(path) < LOW_SPACE_BYTES:
        return MlakitError(f"disk full while writing {path}; free space and run again")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    return MlakitError(f"cannot write {path}: {reason}")


def _free_bytes(path: Path) -> float:
    """Bytes free to this user on the disk of `path` (or of its nearest existing parent)."""
    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(folder).free if folder else math.inf
    except OSError:
        return math.inf


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Any failure of the write in the block as one error line (`disk_error`): each writer raises its own
    type (OSError, safetensors' SafetensorError, torch.save's RuntimeError)."""
    try:
        yield
    except MlakitError:
        raise
    except Exception as exc:  # the writers' own exception types, see above
        raise disk_error(exc, path) from exc


def _umask_mode() -> int:
    """The mode a plain mkdir would give: mkdtemp makes 0700, which would survive the rename."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _temp_folder(out: Path, part: str) -> Path:
    """A new folder `.NAME.PART-XXXX` beside the resolved `out`, where `stale_folders` looks for it."""
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.{part}-", dir=out.parent))
    except OSError as exc:
        raise disk_error(exc, out.parent) from exc


@contextlib.contextmanager
def scratch_folder(out: Path, part: str) -> Iterator[Path]:
    """Yield a temporary folder beside `out` for files that the run needs only while it runs (on the
    disk OUT goes to, not in a temp dir that may be memory); the end of the block removes it,
    whatever ends it, Ctrl-C and SIGTERM included."""
    tmp = _temp_folder(out.resolve(), part)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool, protect: Iterable[Path | None] = (), marker: str = RECORD,
                  what: str = "OUT") -> Iterator[Path]:
    """Yield a temporary folder beside `out`; rename it to `out` only if the block completes, holding
    OUT's lock. At the rename OUT is checked again: one that appeared meanwhile is replaced only with
    `force`, and then only if mlakit may replace it (`check_replaceable`).

    Any exception, Ctrl-C or SIGTERM (which the CLI raises as an exception) removes the folder."""
    out = out.resolve()
    check_output(out, force, protect, marker, what)
    with output_lock(out):
        tmp = _temp_folder(out, "tmp")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        try:
            yield tmp
            tmp.chmod(_umask_mode())
            if out.exists():
                if not force:
                    raise MlakitError(f"{out} appeared while this run was writing it and was left as it is; pass "
                                      "--force to replace it")
                check_replaceable(out, marker, what)
                os.replace(out, old)
            os.replace(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():  # stopped between the two renames: put the previous OUT back
                os.replace(old, out)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)

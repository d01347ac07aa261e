"""Atomic file output: write to a temporary name beside the target, rename into place on success.

Temporary names carry their writer (``~<pid>~<host>~``), so the leftovers of a writer that was
killed (``kill -9``, a power cut) can be told from a write in progress and removed by the next run.

A run's outputs are written into a staging folder and moved into the output folder together. The
move is journalled: once every output is complete in the stage, a journal naming the target folder
and the files is written there, and only then are the files renamed. A run killed during the move
leaves a stage with a journal; the next run into that folder finishes the move (the new set is
complete, the old one was being replaced), so the folder always ends up holding one complete set.
One run at a time writes into an output folder (`output_lock`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from .settings import SettingError

STALE_SECONDS = 3600.0  # a temporary name this old, from another host, belongs to a writer that died
_OWNER_RE = re.compile(r"~(\d+)~([0-9A-Za-z._-]*)~")
STAGE_PREFIX = ".stem-out"  # staging folders of the command line: .stem-out~<pid>~<host>~<random>
JOURNAL = ".moving.json"  # in a stage whose move began: {"out": <resolved folder>, "names": [...]}


def _default_mode() -> int:
    """The mode a plain open() would give a new file (0o666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _host() -> str:
    """This machine's name, reduced to characters that are safe in a file name."""
    return re.sub(r"[^0-9A-Za-z._-]", "_", socket.gethostname())[:64]


def owner_tag() -> str:
    """``~<pid>~<host>~``: put in a temporary name, it says which process writes that file."""
    return f"~{os.getpid()}~{_host()}~"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (signal 0 checks without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def left_by_dead_writer(path: Path, max_age: float = STALE_SECONDS) -> bool:
    """Whether a temporary file or folder was left by a writer that is gone.

    A name with an owner tag of this host is judged by whether its process still runs; any other
    name (another host, no tag, or Windows, where pids cannot be probed safely) by its age.
    """
    match = _OWNER_RE.search(path.name)
    if match and match.group(2) == _host() and os.name != "nt":
        return not pid_alive(int(match.group(1)))
    try:
        return path.lstat().st_mtime < time.time() - max_age
    except OSError:
        return False


def remove_path(path: Path) -> None:
    """Remove a file or a folder tree; whatever is already gone or cannot be removed is left."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on failure it is removed.

    A reader never sees half a file, and a failed write leaves the previous file (if any) intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}{owner_tag()}", suffix=path.suffix)
    os.close(handle)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600 files; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_dead_stages(out: Path) -> None:
    """Clear what killed runs left in `out` or beside it, finishing any move into `out` they began.

    A dead stage with a journal for `out` holds the rest of a complete set of outputs: its files are
    moved in (never deleted). A dead stage with a journal for another folder is left for that
    folder's next run. Any other dead stage, and dead writers' temporary files in `out`, are removed.
    """
    for folder in (out, out.parent):
        try:
            names = list(folder.iterdir())
        except OSError:
            continue
        for path in names:
            if not (path.name.startswith(".") and _OWNER_RE.search(path.name) and (
                    path.name.startswith(STAGE_PREFIX) or folder == out) and left_by_dead_writer(path)):
                continue
            journal = _read_journal(path)
            if journal is None:
                remove_path(path)
            elif Path(journal["out"]) == out.resolve():
                _finish_move(path, out, journal["names"])


def _read_journal(stage: Path) -> dict | None:
    """The move journal of a staging folder, or None when it has none (the move never began)."""
    try:
        data = json.loads((stage / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(data, dict) and isinstance(data.get("out"), str) and isinstance(data.get("names"), list)
            and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in data["names"])):
        return None
    return data


def _finish_move(stage: Path, out: Path, names: list[str]) -> None:
    """Move what is left of a journalled stage into `out`, then remove the stage (a no-op if it fails)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (stage / name).is_file():
                os.replace(stage / name, out / name)
    except OSError:
        return  # keep the stage: it is the only copy of those outputs; the next run tries again
    shutil.rmtree(stage, ignore_errors=True)


def _write_journal(stage: Path, out: Path, names: list[str]) -> None:
    """Write the stage's move journal durably (temp file, fsync, rename, fsync of the folder)."""
    tmp = stage / f"{JOURNAL}.tmp"
    with open(tmp, "w") as handle:
        json.dump({"out": str(out.resolve()), "names": names}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, stage / JOURNAL)
    with contextlib.suppress(OSError):  # not every platform can open a folder
        folder = os.open(stage, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the one-writer lock of output folder `out`, or refuse in one sentence if another run holds it.

    The lock is a file in this user's temporary folder named after the resolved path of `out`, so it
    needs no write access to `out` and leaves nothing there; it binds the runs of this machine.
    """
    from filelock import FileLock, Timeout

    out = Path(out)
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:24]
    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"stem-locks-{uid}"
    folder.mkdir(mode=0o700, exist_ok=True)
    lock = FileLock(folder / f"{key}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise SettingError("out", f"Another run is writing into the output folder {out}; wait for it to finish or "
                           "pass another one.") from None
    try:
        yield
    finally:
        lock.release()


def check_output_folder(out: Path, names: Iterable[str]) -> None:
    """Refuse, in one sentence, an output folder the run could not write its files `names` into.

    Checks before any work: `out` must be a folder or creatable as one, writable (a probe folder
    is made and removed where the outputs will go), and hold no folder under an output's name.
    """
    if out.exists() and not out.is_dir():
        raise SettingError("out", f"The output folder {out} is a file; pass a folder for the outputs (it is created "
                           "if missing).")
    for name in names:
        if (out / name).is_dir():
            raise SettingError("out", f"{out / name} is a folder, so the output {name} cannot be written there; "
                               "move it away or pass another output folder.")
    existing = out
    while not existing.exists():  # the nearest folder that exists: the outputs' folders are made in it
        if existing.is_symlink() or existing.parent == existing:  # a dangling link; the root
            break
        existing = existing.parent
    if not existing.is_dir():
        raise SettingError("out", f"The output folder {out} cannot be created because {existing} is not a folder; "
                           "pass another one.")
    try:
        probe = tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{owner_tag()}", dir=existing)
        os.rmdir(probe)
    except OSError as error:
        raise SettingError("out", f"The output folder {out} is not writable ({error.strerror or error}); pass a "
                           "folder you can write to.") from error


@contextlib.contextmanager
def staged_outputs(out: str | os.PathLike, names: Iterable[str]) -> Iterator[Path]:
    """Yield an empty staging folder for a run's outputs; on success move them into `out` together.

    The staging folder lies in `out` (when it exists) or beside it, on the same file system, so
    the outputs are renamed into place, not copied. On failure, or if any output `names` is
    missing, the staging folder is removed and `out` stays as it was; so it does when the move
    itself fails halfway (the outputs moved so far are put back).

    Args:
        out: the output folder; created (with its parents) only when the outputs are moved in.
        names: the file names the run writes into the staging folder.
    """
    out, names = Path(out), list(names)
    parent = out if out.is_dir() else out.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # deepest first
    parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{owner_tag()}", dir=parent))
    moved = False
    try:
        yield stage
        missing = [name for name in names if not (stage / name).is_file()]
        if missing:
            raise RuntimeError(f"the run did not write {', '.join(missing)}")
        check_output_folder(out, names)  # nothing got in the way while the run worked
        _move_into(stage, out, names)
        moved = True
    finally:
        if moved or not (stage / JOURNAL).exists():  # a stage whose move broke off holds outputs to keep
            shutil.rmtree(stage, ignore_errors=True)
        for folder in created if not moved else ():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only while empty: a failed run leaves no new folders behind


def _move_into(stage: Path, out: Path, names: list[str]) -> None:
    """Rename stage/<name> to out/<name> for every name, all or none.

    If a rename fails, the files moved so far are put back and the previous ones restored. If the
    process dies instead, the journal lets the next run finish the move (`remove_dead_stages`).
    """
    out.mkdir(parents=True, exist_ok=True)
    backups = stage / ".previous"
    backups.mkdir()
    _write_journal(stage, out, names)
    done: list[tuple[str, bool]] = []  # (name, whether an old file was set aside)
    try:
        for name in names:
            target = out / name
            had_old = target.exists() or target.is_symlink()
            if had_old:
                os.replace(target, backups / name)
            done.append((name, had_old))
            os.replace(stage / name, target)
    except OSError:
        try:
            for name, had_old in reversed(done):
                if (out / name).exists() and not (stage / name).exists():
                    os.replace(out / name, stage / name)
                if had_old:
                    os.replace(backups / name, out / name)
            (stage / JOURNAL).unlink()
        except OSError:
            pass  # the journal stays: the stage is kept and the next run finishes the move
        raise

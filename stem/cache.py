"""On-disk cache of inverted latents, so a repeated job or a second edit of a video does no UNet work.

One entry is one safetensors file, ``root/<key>.safetensors``, holding named tensors (e.g. the DDIM
trajectory ``(T+1, N, 4, h, w)`` and uint8 reconstruction frames) and str->str metadata. The key is
:func:`job_key` of the job: its settings, the frames' digest, the model's fingerprint. The job
itself is stored in the entry and compared when it is read, so an entry copied or renamed under
another key is a miss, never a hit; :func:`misfit` checks the tensors a caller expects (name,
dtype, shape, finite values). Entries are serialised in memory and written atomically through a
temp file of this process (``.<key>~<pid>~<host>~<random>.tmp``, fsynced, then ``os.replace``),
verified by a checksum when read, and evicted least-recently-used first once the folder (temp files
of writers in progress included) grows past ``max_bytes``; a file's mtime is its last access time.
Temp files whose writer died (killed mid-write) are removed by the next load, save or eviction.
One job per key runs at a time: :meth:`LatentCache.lock` is a file lock per key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import re
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as serialise

from .errors import StemError
from .settings import SettingError
from .files import left_by_dead_writer, owner_tag

FORMAT_VERSION = 1

_SUFFIX = ".safetensors"
_TMP_SUFFIX = ".tmp"  # temp files are ".<key>~<pid>~<host>~<random>.tmp": never matched by "*.safetensors"
# safetensors' save_file writes through ".tmpXXXXXX" of its own (earlier versions used it): untagged, judged by age
_FOREIGN_TMP_RE = re.compile(r"\.tmp[0-9A-Za-z]{6}")
_LOCK_SUFFIX = ".lock"  # lock files are ".<key>.lock"
_STALE_LOCK_SECONDS = 3600.0  # a free lock file of a key without entry, this old, is removed
_RESERVED = ("stem_format", "stem_checksum", "stem_job")
_KEY_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]*")
_GB = 10**9
_DEFAULT_MAX_GB = 20.0


def default_cache_dir() -> Path:
    """$STEM_CACHE_DIR, else $XDG_CACHE_HOME/stem, else %LOCALAPPDATA%\\stem (Windows) or ~/.cache/stem."""
    if os.environ.get("STEM_CACHE_DIR"):
        return Path(os.environ["STEM_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "stem"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "stem"
    return Path.home() / ".cache" / "stem"


def default_max_bytes() -> int:
    """$STEM_CACHE_MAX_GB (decimal GB, may be fractional) in bytes, else 20 GB."""
    raw = os.environ.get("STEM_CACHE_MAX_GB", "").strip()
    if not raw:
        return int(_DEFAULT_MAX_GB * _GB)
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")
    if not gb >= 0 or gb == float("inf"):  # also rejects NaN
        raise StemError(
            f"STEM_CACHE_MAX_GB={raw!r} is not a size in GB; set it to a number such as 20 or 0.5."
        )
    return int(gb * _GB)


def _json_default(obj: object) -> object:
    """Make the few non-JSON values that appear in settings hashable by value, never by address."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (PurePath, torch.dtype, np.dtype)):
        return str(obj)
    raise TypeError(f"cache job values must be JSON-serialisable; got a {type(obj).__name__}: {obj!r}")


def frames_digest(frames: np.ndarray) -> str:
    """``"<shape> <dtype> sha256:<hex>"`` of an array, e.g. ``"4x64x96x3 |u1 sha256:9f2c..."``."""
    frames = np.asarray(frames)
    if frames.dtype.hasobject:
        raise TypeError("the frames must be a numeric array, not an object array")
    h = hashlib.sha256(memoryview(np.ascontiguousarray(frames)).cast("B"))  # no copy when already C-contiguous
    return f"{'x'.join(map(str, frames.shape))} {frames.dtype.str} sha256:{h.hexdigest()}"


def _job_json(job: Mapping[str, object]) -> str:
    """The canonical JSON of a job (keys sorted), as stored in an entry and hashed into its key."""
    if dataclasses.is_dataclass(job) and not isinstance(job, type):
        job = dataclasses.asdict(job)
    return json.dumps(dict(job), sort_keys=True, default=_json_default)


def job_key(job: Mapping[str, object]) -> str:
    """The cache key of a job: sha256 hex of FORMAT_VERSION and ``json.dumps(job, sort_keys=True)``.

    Args:
        job: everything the result depends on (settings, a digest of the input, the model's
            fingerprint, ...), as a mapping or a dataclass instance. Nested values must be
            JSON-serialisable; dict order does not matter, list order does.
    """
    return hashlib.sha256(f"stem-cache v{FORMAT_VERSION}\n{_job_json(job)}".encode()).hexdigest()


def _job_difference(stored: str | None, expected: str) -> str:
    """What differs between a stored job and the expected one, e.g. "num_steps is 3 there, 2 here"."""
    if stored is None:
        return "it records no job"
    try:
        old = json.loads(stored)
    except ValueError:
        return "its job record is unreadable"
    new = json.loads(expected)
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            short = lambda v: (repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "...")  # noqa: E731
            return f"{name} is {short(old.get(name))} there, {short(new.get(name))} here"
    return "its job record differs"


def _raw_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, for any dtype (bfloat16 and bool included)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _checksum(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 over the user metadata and every tensor's name, dtype, shape and data, names sorted."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(metadata), sort_keys=True).encode() + b"\n")
    for name in sorted(tensors):
        t = tensors[name]
        # nbytes in the record frames the raw data that follows, so records cannot run together
        h.update(json.dumps([name, str(t.dtype), list(t.shape), t.nbytes]).encode() + b"\n")
        h.update(_raw_bytes(t))
    return h.hexdigest()


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; ones sharing storage with an earlier one are cloned."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"cache tensors must map str to torch.Tensor; got {name!r}: {type(t).__name__}")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel() > 0:  # safetensors refuses tensors that share memory
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[name] = t
    return out


def misfit(tensors: Mapping[str, torch.Tensor],
           expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> str | None:
    """Why `tensors` are not the ones a caller expects (a sentence part), or None if they fit.

    Each expected name must be there with exactly its dtype and shape, and a floating-point tensor
    must hold finite values only: a NaN or inf entry is a miss, never served.

    Args:
        tensors: name -> tensor, e.g. ``CacheEntry.tensors``.
        expected: name -> (dtype, shape), e.g. ``{"trajectory": (torch.float32, (T + 1, N, 4, h, w))}``.

    Returns:
        e.g. ``"holds a trajectory of dtype float16, not float32"``, or None.
    """
    name_of = lambda dtype: str(dtype).removeprefix("torch.")  # noqa: E731
    for name, (dtype, shape) in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            return f"has no {name}"
        if tensor.dtype != dtype:
            return f"holds a {name} of dtype {name_of(tensor.dtype)}, not {name_of(dtype)}"
        if tuple(tensor.shape) != tuple(shape):
            return f"holds a {name} of shape {tuple(tensor.shape)}, not {tuple(shape)}"
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return f"holds a {name} with NaN or infinite values"
    return None


class _Corrupt(Exception):
    """A cache file that exists but cannot be trusted; the message is the reason."""


def _read_entry(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and verify one cache file (metadata with its "stem_job"); raises _Corrupt for bad contents."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # SafetensorError, OSError, ...: unreadable means recompute
        raise _Corrupt(f"{type(e).__name__}: {e}") from e
    version = metadata.pop("stem_format", None)
    if version != str(FORMAT_VERSION):
        raise _Corrupt(f"format version {version!r}, expected {FORMAT_VERSION!r}")
    expected = metadata.pop("stem_checksum", None)
    if expected is None:
        raise _Corrupt("no checksum")
    if _checksum(tensors, metadata) != expected:
        raise _Corrupt("checksum mismatch")
    return tensors, metadata


def _write_and_sync(fd: int, data: bytes) -> None:
    """Write all of `data` to the open file `fd`, flush it to the disk, close it."""
    with open(fd, "wb", closefd=True) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _stat_id(path: Path) -> tuple[int, int, int] | None:
    """Identity of the file now at path (inode, size, mtime), or None if there is none."""
    try:
        return _stat_id_of(os.stat(path))
    except OSError:
        return None


def _stat_id_of(st: os.stat_result) -> tuple[int, int, int]:
    """Identity of a file from its stat: inode, size, mtime."""
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _total_size(paths: list[Path]) -> int:
    """Sum of the files' sizes; files gone meanwhile count 0."""
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    return total


@dataclass
class CacheEntry:
    """One cache hit: the tensors and user metadata that were saved, and the file they came from."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    path: Path
    job: dict | None = None  # the job saved with the entry, if any
    file_id: tuple[int, int, int] | None = None  # the file read (inode, size, mtime), so discard() spares a newer one


class LatentCache:
    """A folder of safetensors files keyed by :func:`job_key`, bounded by LRU eviction.

    Nothing is created on disk until the first :meth:`save`, :meth:`lock` (or
    :meth:`ensure_writable`). Safe for several processes sharing one folder: writers replace whole
    files atomically, readers verify a checksum and the job an entry was made for, and
    :meth:`lock` lets one job per key compute while the others wait for its entry.

    Args:
        root: cache folder; default :func:`default_cache_dir`.
        max_bytes: size limit of all entries (and temp files) together; default :func:`default_max_bytes`.
    """

    def __init__(self, root: str | Path | None = None, max_bytes: int | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_bytes = int(max_bytes) if max_bytes is not None else default_max_bytes()
        if self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")

    def __repr__(self) -> str:
        return f"LatentCache(root={str(self.root)!r}, max_bytes={self.max_bytes})"

    def path_for(self, key: str) -> Path:
        """``root / f"{key}.safetensors"``; the key must be a plain file-name stem (e.g. a hex digest)."""
        if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
            raise ValueError(f"cache key must be letters, digits, '_', '.' or '-', got {key!r}")
        return self.root / f"{key}{_SUFFIX}"

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[bool]:
        """Hold the file lock of one key: the job that computes its entry runs alone, others wait.

        Use it around "load, or compute and save". Yields True while the lock is held, or False when
        the folder cannot hold a lock file (a read-only cache, which still serves its entries).
        """
        from filelock import FileLock

        path = self.path_for(key)
        lock = FileLock(str(path.with_name(f".{key}{_LOCK_SUFFIX}")))
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        except OSError:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def load(self, key: str, job: Mapping[str, object] | None = None) -> CacheEntry | None:
        """The entry saved under key, or None if there is none or it cannot be used.

        A corrupt file (unreadable, truncated, wrong format version, checksum mismatch) is reported
        with a warning and deleted; an entry made for another `job` (copied or renamed under this
        key, or written before jobs were recorded) and anything that is not a regular file are
        reported and ignored, so the caller recomputes and overwrites them. This never raises for a
        bad file. A hit marks the entry as recently used. Temp files of dead writers are removed.

        Args:
            key: usually ``job_key(job)``.
            job: the job the caller wants; None skips the comparison.
        """
        path = self.path_for(key)
        self._remove_dead_tmp()
        try:
            before = os.stat(path)  # never open what is not a regular file: a FIFO would block forever
        except OSError:
            return None
        if stat.S_ISDIR(before.st_mode):
            return None  # no entry; save() makes way for one, or says in one warning why it cannot
        if not stat.S_ISREG(before.st_mode):
            warnings.warn(f"STEM cache entry {path} is not a regular file; ignoring it and recomputing.", stacklevel=2)
            return None
        try:
            tensors, metadata = _read_entry(path)
        except FileNotFoundError:  # evicted or cleared by another process just now
            return None
        except _Corrupt as e:
            warnings.warn(f"STEM cache file {path} is corrupt ({e}); recomputing.", stacklevel=2)
            if _stat_id(path) == _stat_id_of(before):  # do not delete a good file a concurrent writer just put there
                try:
                    path.unlink()
                except OSError:
                    pass
            return None
        stored = metadata.pop("stem_job", None)
        if job is not None and stored != _job_json(job):
            warnings.warn(
                f"STEM cache entry {path} was made for another job ({_job_difference(stored, _job_json(job))}); "
                "recomputing.",
                stacklevel=2,
            )
            return None
        try:
            os.utime(path)  # mtime is the LRU clock
        except OSError:
            pass  # a read-only cache still serves hits
        now = _stat_id(path)  # after the utime; the same inode as read, or None (replaced meanwhile)
        return CacheEntry(tensors=tensors, metadata=metadata, path=path, job=json.loads(stored) if stored else None,
                          file_id=now if now is not None and now[0] == before.st_ino else None)

    def discard(self, entry: CacheEntry) -> None:
        """Delete an entry the caller found unusable (e.g. wrong dtype), unless a writer replaced it since."""
        if entry.file_id is not None and _stat_id(entry.path) == entry.file_id:
            try:
                entry.path.unlink()
            except OSError:
                pass

    def ensure_writable(self) -> None:
        """Create the cache folder and check a file can be written there; raises StemError if not.

        Call before a long computation whose result will be saved, so a bad folder fails early.
        """
        self._mkdir()
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".probe{owner_tag()}", suffix=_TMP_SUFFIX, dir=self.root)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise self._unwritable(e) from e

    def save(
        self,
        key: str,
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        job: Mapping[str, object] | None = None,
    ) -> Path:
        """Write an entry atomically, then evict least-recently-used entries down to max_bytes.

        Args:
            key: usually ``job_key(job)``.
            tensors: name -> tensor, any device and dtype; stored contiguous on the CPU.
            metadata: str -> str kept beside the tensors; the keys ``stem_format``,
                ``stem_checksum`` and ``stem_job`` are reserved.
            job: the job the entry is for, stored (under the checksum) and compared by :meth:`load`.

        Returns:
            The path of the entry. The entry itself is never evicted by this call, even when it
            alone exceeds max_bytes (that is warned about).

        Raises:
            StemError: the cache folder cannot be created or written (read-only, full), or a folder
                that is not empty sits at the entry's name; nothing is left behind then.
        """
        path = self.path_for(key)
        metadata = dict(metadata or {})
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(f"cache metadata must map str to str; got {k!r}: {type(v).__name__}")
            if k in _RESERVED:
                raise ValueError(f"cache metadata key {k!r} is reserved")
        if job is not None:
            metadata["stem_job"] = _job_json(job)
        tensors = _prepare(tensors)
        header = {**metadata, "stem_format": str(FORMAT_VERSION), "stem_checksum": _checksum(tensors, metadata)}

        self._mkdir()
        self._clear_the_way(path)
        data = serialise(tensors, metadata=header)  # in memory: no file of safetensors' own is ever left behind
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{key}{owner_tag()}", suffix=_TMP_SUFFIX, dir=self.root)
        except OSError as e:
            raise self._unwritable(e) from e
        try:
            _write_and_sync(fd, data)
            os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a mix
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise self._unwritable(e) from e
            raise
        finally:
            del data
        self._fsync_dir()

        self.evict(keep=key)
        size = path.stat().st_size
        if size > self.max_bytes:
            warnings.warn(
                f"STEM cache entry {path} is {size / _GB:.2f} GB, more than the cache limit of "
                f"{self.max_bytes / _GB:.2f} GB; keeping it anyway. Raise STEM_CACHE_MAX_GB to avoid this.",
                stacklevel=2,
            )
        return path

    def evict(self, keep: str | None = None) -> list[Path]:
        """Delete least-recently-used entries until the cache fits in max_bytes.

        Temp files of writers in progress count towards the size but are never deleted; those of
        dead writers are removed first, and so are free lock files of keys that have no entry.

        Args:
            keep: a key never to evict (the entry just written).

        Returns:
            The entry paths deleted, oldest first.
        """
        keep_path = self.path_for(keep) if keep is not None else None
        self._remove_dead_tmp()
        self._remove_unused_locks()
        entries = []  # (mtime, size, path)
        for path in self._entries():
            try:
                st = path.stat()
            except OSError:
                continue
            entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries) + _total_size(self._temp_files())
        evicted = []
        for _, size, path in sorted(entries, key=lambda e: (e[0], e[2].name)):
            if total <= self.max_bytes:
                break
            if path == keep_path:
                continue
            try:
                path.unlink()
            except FileNotFoundError:  # another process evicted it first
                pass
            except OSError:
                continue
            else:
                evicted.append(path)
            total -= size
        return evicted

    def size_bytes(self) -> int:
        """Total size of all entries and of the temp files of writers in progress."""
        return _total_size(self._entries() + self._temp_files())

    def clear(self) -> None:
        """Delete every entry (and dead writers' temp files); the folder itself and other files stay."""
        self._remove_dead_tmp()
        for path in self._entries():
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def _entries(self) -> list[Path]:
        """All entry files in the cache folder; none if it does not exist."""
        return [p for p in self._listing() if p.name.endswith(_SUFFIX) and not p.name.startswith(".")]

    def _listing(self) -> list[Path]:
        """Everything in the cache folder; nothing if it does not exist or cannot be read."""
        try:
            return list(self.root.iterdir())
        except OSError:
            return []

    def _temp_files(self) -> list[Path]:
        """The temp files of writers, alive or dead (safetensors' own ``.tmpXXXXXX`` of earlier versions too)."""
        return [p for p in self._listing() if (p.name.startswith(".") and p.name.endswith(_TMP_SUFFIX))
                or _FOREIGN_TMP_RE.fullmatch(p.name)]

    def _remove_dead_tmp(self) -> None:
        """Remove temp files whose writer is gone (its process ended, e.g. killed mid-write)."""
        for path in self._temp_files():
            if left_by_dead_writer(path):
                try:
                    path.unlink()
                except OSError:
                    pass

    def _remove_unused_locks(self) -> None:
        """Remove lock files, over an hour old, of keys without an entry, when nobody holds them."""
        from filelock import FileLock, Timeout

        cutoff = time.time() - _STALE_LOCK_SECONDS
        for path in self._listing():
            name = path.name
            if not (name.startswith(".") and name.endswith(_LOCK_SUFFIX)):
                continue
            try:
                if path.stat().st_mtime > cutoff or path.with_name(name[1:-len(_LOCK_SUFFIX)] + _SUFFIX).exists():
                    continue
                lock = FileLock(str(path))
                lock.acquire(timeout=0)
            except (OSError, Timeout):
                continue
            try:
                path.unlink()  # while held: a waiter on this inode notices it is gone and makes a new one
            except OSError:
                pass
            finally:
                lock.release()

    def _mkdir(self) -> None:
        """Create the cache folder on demand."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise self._unwritable(e) from e
        if not self.root.is_dir():
            raise self._unwritable(NotADirectoryError(f"{self.root} is not a folder"))

    def _clear_the_way(self, path: Path) -> None:
        """Make room for an entry where an empty folder sits at its name; refuse a folder with contents."""
        if not path.is_dir() or path.is_symlink():
            return  # nothing, or a file (even a FIFO or a link): os.replace puts the entry over it
        try:
            path.rmdir()
        except OSError as e:
            raise SettingError("", f"The cache entry {path} is a folder, so the result is not cached; move that folder "
                               "away or pass another {cache_dir}.", mentions={"cache_dir": "cache folder"}) from e

    def _fsync_dir(self) -> None:
        """Make the rename durable (POSIX only; best effort)."""
        if os.name == "nt":
            return
        try:
            fd = os.open(self.root, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _unwritable(self, e: OSError) -> StemError:
        """The user-facing error for a cache folder that cannot be created or written."""
        reason = e.strerror or str(e)
        return SettingError("", f"Cannot write to the cache folder {self.root} ({reason}), so the result is not "
                            "cached; pass {cache_dir} or set STEM_CACHE_DIR to a writable folder with free space.",
                            mentions={"cache_dir": "another cache folder"})

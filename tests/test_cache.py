"""The latent cache: round trips, keys, corruption handling, atomic writes, LRU eviction, defaults."""

import dataclasses
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import stem.cache as cache_mod
from stem.cache import FORMAT_VERSION, LatentCache, cache_key, default_cache_dir, default_max_bytes
from stem.cli import cli_message
from stem.errors import StemError

KEY = "ab" * 32


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small stand-in for one inversion: trajectory (T+1, N, 4, h, w), reconstruction frames, a fp16 extra."""
    g = torch.Generator().manual_seed(seed)
    return {
        "inverted_latents": torch.randn(3, 2, 4, 8, 8, generator=g),
        "reconstruction": torch.randint(0, 256, (2, 16, 16, 3), generator=g, dtype=torch.uint8),
        "half": torch.randn(5, 7, generator=g).half(),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def leftovers(root) -> list[str]:
    """Everything in the cache folder that is not a finished entry."""
    return [p.name for p in root.iterdir() if not p.name.endswith(".safetensors")]


def data_offset(path) -> int:
    """Where the tensor data starts in a safetensors file (8-byte header length, then JSON header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    return 8 + n


# --- round trip and keys ---------------------------------------------------------------------------


def test_round_trip_tensors_and_metadata(tmp_path):
    cache = LatentCache(tmp_path / "cache")
    tensors = make_tensors()
    meta = {"model": "tiny-sd", "num_frames": "2"}
    path = cache.save(KEY, tensors, meta)
    assert path == cache.path_for(KEY) == tmp_path / "cache" / f"{KEY}.safetensors"
    assert leftovers(tmp_path / "cache") == []

    entry = cache.load(KEY)
    assert entry is not None
    assert_same(entry.tensors, tensors)
    assert entry.metadata == meta  # reserved keys are not handed back
    assert entry.path == path
    assert cache.size_bytes() == path.stat().st_size


def test_load_missing_returns_none_and_creates_nothing(tmp_path):
    cache = LatentCache(tmp_path / "cache")
    assert cache.load(KEY) is None
    assert not (tmp_path / "cache").exists()
    assert cache.size_bytes() == 0


def test_save_non_contiguous_shared_and_bfloat16(tmp_path):
    cache = LatentCache(tmp_path)
    traj = torch.randn(4, 3, 5)
    tensors = {
        "trajectory": traj,
        "last": traj[-1],  # shares storage with trajectory: safetensors alone would refuse this
        "transposed": traj.transpose(0, 2),  # not contiguous
        "bf16": torch.randn(6).bfloat16(),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "grad": torch.ones(2, requires_grad=True),
    }
    cache.save(KEY, tensors)
    entry = cache.load(KEY)
    assert entry is not None
    assert_same(entry.tensors, {k: v.detach() for k, v in tensors.items()})


def test_reserved_metadata_rejected(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        LatentCache(tmp_path).save(KEY, make_tensors(), {"stem_checksum": "x"})


@pytest.mark.parametrize("bad", ["", "../evil", "a/b", ".hidden", "a\\b"])
def test_bad_keys_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        LatentCache(tmp_path).path_for(bad)


def test_cache_key_deterministic_and_sensitive():
    frames = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    settings = {"model": "sd15", "steps": 50, "em": {"num_bases": 256, "num_iters": 3}, "scales": [1.0, 2.0]}
    key = cache_key(frames, settings)
    assert len(key) == 64 and int(key, 16) >= 0
    assert cache_key(frames.copy(), dict(settings)) == key

    # same dict, another insertion order (top level and nested): same key
    reordered = {"scales": [1.0, 2.0], "em": {"num_iters": 3, "num_bases": 256}, "steps": 50, "model": "sd15"}
    assert cache_key(frames, reordered) == key

    # a non-contiguous view with the same contents hashes like the contiguous array
    assert cache_key(np.asfortranarray(frames), settings) == key

    flipped = frames.copy()
    flipped[1, 4, 4, 2] ^= 1
    assert cache_key(flipped, settings) != key
    assert cache_key(frames.astype(np.int16), settings) != key  # dtype counts
    assert cache_key(frames.reshape(3, 4, 16, 3), settings) != key  # shape counts
    changed = [
        {**settings, "steps": 51},
        {**settings, "model": "sd21"},
        {**settings, "em": {"num_bases": 256, "num_iters": 4}},
        {**settings, "scales": [2.0, 1.0]},
        {**settings, "extra": None},
    ]
    keys = {cache_key(frames, s) for s in changed}
    assert key not in keys and len(keys) == len(changed)


def test_cache_key_accepts_frozen_settings_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Settings:
        model: str = "sd15"
        steps: int = 50

    frames = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    assert cache_key(frames, Settings()) == cache_key(frames, {"steps": 50, "model": "sd15"})
    with pytest.raises(TypeError, match="JSON"):
        cache_key(frames, {"thing": object()})


# --- corrupt files ---------------------------------------------------------------------------------


def corrupt_truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_empty(path):
    path.write_bytes(b"")


def corrupt_garbage(path):
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def corrupt_flipped_data_byte(path):
    data = bytearray(path.read_bytes())
    i = data_offset(path) + (len(data) - data_offset(path)) // 2
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def corrupt_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x80
    path.write_bytes(bytes(data))


def corrupt_wrong_version(path):
    save_file(make_tensors(), str(path), {"stem_format": str(FORMAT_VERSION + 1), "stem_checksum": "0"})


def corrupt_no_checksum(path):
    save_file(make_tensors(), str(path), {"stem_format": str(FORMAT_VERSION)})


def corrupt_plain_safetensors(path):
    save_file(make_tensors(), str(path))  # written by something else: no metadata at all


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (corrupt_truncated, "SafetensorError"),
        (corrupt_empty, "SafetensorError"),
        (corrupt_garbage, "SafetensorError"),
        (corrupt_flipped_data_byte, "checksum mismatch"),
        (corrupt_last_byte, "checksum mismatch"),
        (corrupt_wrong_version, "format version '2', expected 1"),
        (corrupt_no_checksum, "no checksum"),
        (corrupt_plain_safetensors, "format version None"),
    ],
)
def test_corrupt_file_warns_deletes_and_recovers(tmp_path, corrupt, reason):
    cache = LatentCache(tmp_path)
    path = cache.save(KEY, make_tensors())
    corrupt(path)

    with pytest.warns(UserWarning, match=r"cache file .* is corrupt \(.+\); recomputing\.") as record:
        assert cache.load(KEY) is None
    assert reason in str(record[0].message)
    assert not path.exists()

    # a later save / load works
    cache.save(KEY, make_tensors(seed=1))
    entry = cache.load(KEY)
    assert entry is not None
    assert_same(entry.tensors, make_tensors(seed=1))


def test_checksum_covers_metadata(tmp_path):
    cache = LatentCache(tmp_path)
    path = cache.save(KEY, make_tensors(), {"prompt": "a cat"})
    data = path.read_bytes()
    assert b"a cat" in data
    path.write_bytes(data.replace(b"a cat", b"a dog"))  # same length: header still parses
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert cache.load(KEY) is None


def test_good_hit_does_not_warn(tmp_path):
    cache = LatentCache(tmp_path)
    cache.save(KEY, make_tensors())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.load(KEY) is not None


# --- atomic save -----------------------------------------------------------------------------------


def test_failure_inside_the_write_leaves_nothing(tmp_path, monkeypatch):
    cache = LatentCache(tmp_path)

    def half_write_then_fail(fd, data):
        with open(fd, "wb") as f:
            f.write(data[: len(data) // 2])
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cache_mod, "_write_and_sync", half_write_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        cache.save(KEY, make_tensors())
    assert list(tmp_path.iterdir()) == []


def test_failure_in_replace_keeps_old_entry_and_no_temp(tmp_path, monkeypatch):
    cache = LatentCache(tmp_path)
    cache.save(KEY, make_tensors(seed=0))

    def fail_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod.os, "replace", fail_replace)
    with pytest.raises(StemError, match="STEM_CACHE_DIR"):
        cache.save(KEY, make_tensors(seed=1))
    monkeypatch.undo()

    assert leftovers(tmp_path) == []
    entry = cache.load(KEY)  # the previous entry is intact
    assert entry is not None
    assert_same(entry.tensors, make_tensors(seed=0))


def test_failed_first_save_leaves_no_file_for_key(tmp_path, monkeypatch):
    cache = LatentCache(tmp_path)
    monkeypatch.setattr(cache_mod.os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(StemError):
        cache.save(KEY, make_tensors())
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_of_one_key(tmp_path):
    cache = LatentCache(tmp_path)
    errors = []

    def write(seed):
        try:
            for _ in range(5):
                cache.save(KEY, make_tensors(seed))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert leftovers(tmp_path) == []
    entry = cache.load(KEY)
    assert entry is not None
    assert any(torch.equal(entry.tensors["inverted_latents"], make_tensors(s)["inverted_latents"]) for s in range(4))


# --- LRU eviction ----------------------------------------------------------------------------------


def test_lru_eviction_keeps_recently_loaded(tmp_path):
    cache = LatentCache(tmp_path, max_bytes=10**12)
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    path_a = cache.save(a, make_tensors(0))
    size = path_a.stat().st_size
    cache.max_bytes = 2 * size + size // 2  # room for two entries
    path_b = cache.save(b, make_tensors(1))
    assert path_b.stat().st_size == size
    os.utime(path_a, (1000, 1000))  # A is older than B ...
    os.utime(path_b, (2000, 2000))

    assert cache.load(a) is not None  # ... until a hit refreshes it
    assert path_a.stat().st_mtime > 2000

    path_c = cache.save(c, make_tensors(2))
    assert path_a.exists() and path_c.exists()
    assert not path_b.exists()
    assert cache.size_bytes() == 2 * size
    assert cache.load(b) is None


def test_evict_returns_oldest_first_and_never_the_kept_key(tmp_path):
    cache = LatentCache(tmp_path, max_bytes=10**12)
    keys = [f"k{i}" for i in range(4)]
    for i, k in enumerate(keys):
        os.utime(cache.save(k, make_tensors(i)), (1000 + i, 1000 + i))
    cache.max_bytes = 0
    evicted = cache.evict(keep="k0")  # k0 is the oldest, but kept
    assert evicted == [cache.path_for(k) for k in keys[1:]]
    assert [p.name for p in tmp_path.iterdir()] == ["k0.safetensors"]


def test_entry_larger_than_limit_is_kept_with_warning(tmp_path):
    cache = LatentCache(tmp_path, max_bytes=10)
    with pytest.warns(UserWarning, match="keeping it anyway"):
        cache.save("old", make_tensors(0))
    with pytest.warns(UserWarning, match="more than the cache limit"):
        path = cache.save(KEY, make_tensors(1))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert cache.load(KEY) is not None


def test_temp_files_count_towards_the_size_and_stale_ones_are_cleaned(tmp_path):
    cache = LatentCache(tmp_path)
    path = cache.save(KEY, make_tensors())
    fresh = tmp_path / f".{KEY}.fresh.tmp"  # untagged names (another host, an old version): judged by age
    stale = tmp_path / f".{KEY}.stale.tmp"
    other = tmp_path / "notes.txt"
    for p in (fresh, stale, other):
        p.write_bytes(b"x" * 1000)
    os.utime(stale, (1000, 1000))
    assert cache.size_bytes() == path.stat().st_size + 2000  # temp files count while they exist

    assert cache.evict() == []
    assert fresh.exists() and other.exists() and not stale.exists()
    assert cache.size_bytes() == path.stat().st_size + 1000

    cache.clear()
    assert not path.exists() and fresh.exists() and other.exists()
    assert cache.size_bytes() == 1000


# --- defaults and environment ----------------------------------------------------------------------


def test_default_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("STEM_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "mine"
    assert LatentCache().root == tmp_path / "mine"

    monkeypatch.delenv("STEM_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "stem"

    monkeypatch.setenv("STEM_CACHE_DIR", "")  # empty counts as unset
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if os.name != "nt":
        assert default_cache_dir() == tmp_path / "home" / ".cache" / "stem"


def test_default_max_bytes_env(monkeypatch):
    monkeypatch.delenv("STEM_CACHE_MAX_GB", raising=False)
    assert default_max_bytes() == 20 * 10**9
    monkeypatch.setenv("STEM_CACHE_MAX_GB", "1.5")
    assert default_max_bytes() == 1_500_000_000
    assert LatentCache(root="unused").max_bytes == 1_500_000_000
    for bad in ("lots", "-1", "nan", "inf"):
        monkeypatch.setenv("STEM_CACHE_MAX_GB", bad)
        with pytest.raises(StemError, match="STEM_CACHE_MAX_GB"):
            default_max_bytes()


def test_unwritable_root_raises_stem_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for root in (blocker / "cache", blocker):
        cache = LatentCache(root)
        with pytest.raises(StemError, match="pass another cache folder or set STEM_CACHE_DIR") as error:
            cache.save(KEY, make_tensors())
        assert "pass --cache-dir or set STEM_CACHE_DIR" in cli_message(error.value)
        with pytest.raises(StemError, match="STEM_CACHE_DIR"):
            cache.ensure_writable()
        assert cache.load(KEY) is None  # reading a bad root is just a miss
    assert blocker.read_text() == "not a folder"


def test_permission_denied_in_root_raises_stem_error(tmp_path, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_mod.tempfile, "mkstemp", denied)  # what a read-only folder does, even for root
    with pytest.raises(StemError, match="Permission denied.*another cache folder or set STEM_CACHE_DIR"):
        LatentCache(tmp_path).save(KEY, make_tensors())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="needs POSIX permissions that bind the user")
def test_read_only_root_raises_stem_error(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(StemError, match="STEM_CACHE_DIR"):
            LatentCache(root).save(KEY, make_tensors())
        assert list(root.iterdir()) == []
    finally:
        root.chmod(0o700)


def test_ensure_writable_creates_folder(tmp_path):
    cache = LatentCache(tmp_path / "deep" / "cache")
    cache.ensure_writable()
    assert cache.root.is_dir() and list(cache.root.iterdir()) == []


# --- the job an entry was made for -----------------------------------------------------------------

JOB = {"model_fingerprint": "tiny-random:0", "num_steps": 3, "frames": "4x64x96x3 |u1 sha256:00"}


def test_an_entry_is_served_only_for_the_job_it_was_made_for(tmp_path):
    cache = LatentCache(tmp_path)
    cache.save(KEY, make_tensors(), {"note": "x"}, job=JOB)
    entry = cache.load(KEY, job=dict(reversed(list(JOB.items()))))  # key order does not matter
    assert entry is not None and entry.job == JOB and entry.metadata == {"note": "x"}
    with pytest.warns(UserWarning, match=r"made for another job \(num_steps is 3 there, 2 here\); recomputing"):
        assert cache.load(KEY, job={**JOB, "num_steps": 2}) is None
    assert cache.path_for(KEY).exists()  # left for the recomputation to overwrite
    cache.save("other", make_tensors())  # an entry that records no job (written by an older version)
    with pytest.warns(UserWarning, match="records no job"):
        assert cache.load("other", job=JOB) is None


def test_the_job_record_is_under_the_checksum(tmp_path):
    cache = LatentCache(tmp_path)
    path = cache.save(KEY, make_tensors(), job=JOB)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'\\"num_steps\\": 3', b'\\"num_steps\\": 2'))  # same length, header still parses
    assert path.read_bytes() != data
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert cache.load(KEY, job={**JOB, "num_steps": 2}) is None


def test_job_key_depends_on_every_field_and_not_on_order():
    key = cache_mod.job_key(JOB)
    assert cache_mod.job_key(dict(reversed(list(JOB.items())))) == key
    assert len({key} | {cache_mod.job_key({**JOB, name: "changed"}) for name in JOB}) == len(JOB) + 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX FIFOs")
def test_a_fifo_under_an_entry_name_is_not_opened(tmp_path):
    cache = LatentCache(tmp_path)
    os.mkfifo(cache.path_for(KEY))
    outcome = []

    def load():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outcome.append((cache.load(KEY), [str(w.message) for w in caught]))

    reader = threading.Thread(target=load, daemon=True)
    reader.start()
    reader.join(timeout=30)
    if reader.is_alive():  # opening a FIFO blocks until a writer comes: be that writer, then fail
        os.close(os.open(cache.path_for(KEY), os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("load() opened the FIFO and blocked")
    entry, messages = outcome[0]
    assert entry is None and any("not a regular file" in m for m in messages)
    cache.save(KEY, make_tensors())  # the entry replaces it
    assert cache.load(KEY) is not None


# --- one job per key, writers that die -------------------------------------------------------------


def test_lock_lets_one_holder_in_at_a_time(tmp_path):
    cache = LatentCache(tmp_path / "cache")
    events = []

    def hold(name):
        with cache.lock(KEY) as held:
            events.append((name, "in", held))
            time.sleep(0.3)
            events.append((name, "out", held))

    threads = [threading.Thread(target=hold, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [e[1] for e in events] == ["in", "out", "in", "out"] and all(e[2] for e in events)
    assert events[0][0] == events[1][0]


def test_unused_lock_files_are_removed_and_held_ones_kept(tmp_path):
    cache = LatentCache(tmp_path)
    cache.save(KEY, make_tensors())
    with cache.lock("held"):
        with cache.lock("gone"):
            pass
        with cache.lock(KEY):
            pass
        for name in ("held", "gone", KEY):
            os.utime(tmp_path / f".{name}.lock", (1000, 1000))  # old
        cache.evict()
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".lock"))
    assert left == [f".{KEY}.lock", ".held.lock"]  # its entry exists; still held


WRITER = """
import os, sys, time
import stem.cache as cache

def stuck_write(fd, data):
    os.write(fd, b"x" * 5000)
    print("writing", flush=True)
    time.sleep(600)

cache._write_and_sync = stuck_write
cache.LatentCache(sys.argv[1]).save("k" * 64, {"a": cache.torch.zeros(1)})
"""


@pytest.mark.skipif(os.name == "nt", reason="kill -9 is POSIX")
def test_a_writer_killed_mid_write_leaves_a_temp_file_that_counts_until_the_next_load(tmp_path):
    root = tmp_path / "cache"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        (tmp,) = [p for p in root.iterdir() if p.name.endswith(".tmp")]
        assert f"~{writer.pid}~" in tmp.name
        cache = LatentCache(root, max_bytes=10**9)
        assert cache.load(KEY) is None and tmp.exists()  # the writer is alive: its file stays
        assert cache.size_bytes() == 5000  # and counts towards the size bound
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    assert cache.load(KEY) is None
    assert not tmp.exists() and cache.size_bytes() == 0


KILLED_IN_SAVE = """
import sys
import torch
import stem.cache as cache
cache.LatentCache(sys.argv[1]).save("k" * 64, {"big": torch.arange(2**18, dtype=torch.float32)})
"""


@pytest.mark.skipif(shutil.which("strace") is None or os.name == "nt", reason="needs strace (syscall injection)")
def test_a_kill_during_the_write_leaves_only_a_temp_file_that_counts_and_is_swept(tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    renames = "rename,renameat,renameat2"  # killed on the way into the first rename, whoever makes it
    proc = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={renames}",
                           "-e", f"inject={renames}:signal=KILL:when=1", sys.executable, "-c", KILLED_IN_SAVE,
                           str(root)], capture_output=True, text=True, timeout=300)
    if "ptrace" in proc.stderr or "PTRACE" in proc.stderr:
        pytest.skip(f"strace cannot trace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode != 0, proc.stderr
    left = {p.name: p.stat().st_size for p in root.iterdir()}
    assert left and not any(name.endswith(".safetensors") for name in left)  # killed before the entry existed
    assert max(left.values()) > 2**20  # an entry-sized file is there
    cache = LatentCache(root, max_bytes=10**9)
    assert cache.size_bytes() == sum(left.values())  # every byte of it counts towards the bound
    assert cache.load("k" * 64) is None
    assert list(root.iterdir()) == []  # its writer is dead: the next load removes it


def test_safetensors_own_temp_files_count_and_stale_ones_are_swept(tmp_path):
    cache = LatentCache(tmp_path)
    path = cache.save(KEY, make_tensors())
    stale, fresh = tmp_path / ".tmpAb3dE9", tmp_path / ".tmpZz81Qx"  # save_file's names: no owner, judged by age
    for p in (stale, fresh):
        p.write_bytes(b"x" * 700)
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    assert cache.size_bytes() == path.stat().st_size + 1400
    cache.evict()
    assert not stale.exists() and fresh.exists()
    assert cache.size_bytes() == path.stat().st_size + 700


def test_save_makes_no_file_but_its_own_tagged_temp(tmp_path, monkeypatch):
    cache = LatentCache(tmp_path)
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return real(src, dst)

    monkeypatch.setattr(cache_mod.os, "replace", spy)
    cache.save(KEY, make_tensors())
    (names,) = seen
    (name,) = names
    assert name.startswith(f".{KEY}~{os.getpid()}~") and name.endswith(".tmp")


# --- misfit: what a caller expects of an entry ------------------------------------------------------


SPEC = {"inverted_latents": (torch.float32, (3, 2, 4, 8, 8)), "reconstruction": (torch.uint8, (2, 16, 16, 3))}


@pytest.mark.parametrize("name,value,words", [
    ("inverted_latents", lambda t: t.half(), "holds a inverted_latents of dtype float16, not float32"),
    ("inverted_latents", lambda t: t.double(), "of dtype float64, not float32"),
    ("inverted_latents", lambda t: t[:2], "of shape (2, 2, 4, 8, 8), not (3, 2, 4, 8, 8)"),
    ("reconstruction", lambda t: t.float(), "holds a reconstruction of dtype float32, not uint8"),
    ("reconstruction", lambda t: t.long(), "of dtype int64, not uint8"),
    ("inverted_latents", lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), "with NaN or infinite values"),
    ("inverted_latents", lambda t: t.index_fill(0, torch.tensor([2]), float("inf")), "with NaN or infinite values"),
    ("reconstruction", None, "has no reconstruction"),
])
def test_misfit_names_what_is_wrong(name, value, words):
    tensors = make_tensors()
    assert cache_mod.misfit(tensors, SPEC) is None
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value(tensors[name])
    assert words in cache_mod.misfit(tensors, SPEC)

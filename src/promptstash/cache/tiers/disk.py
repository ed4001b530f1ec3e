"""The local disk tier: one file per block under a cache directory, LRU within a size cap.

    <root>/v1/<first 2 hex digits>/<block hash hex>.kv      written as .tmp then renamed (atomic)

NOTE: a file is only ever seen under its final name complete (temp file + rename), and every entry
carries a checksum, so a process killed mid-write leaves at most a stray .tmp file (removed at start).
Entries hold the attention state of users' prompts: files are created 0600 and the directories this tier
creates (the cache root when missing, v1/ and the subdirectories) 0700, whatever the process umask.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from promptstash.cache.tiers.base import TierStats
from promptstash.cache.tiers.entry import CorruptEntryError, read_header

log = logging.getLogger("promptstash.tiers")

FILE_MODE = 0o600
DIR_MODE = 0o700
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _private_dir(path: Path, tighten_existing: bool = True) -> None:
    """Create `path` 0700 (mkdir's mode is masked by the umask, hence the chmod). An existing directory is
    tightened only when it is ours (v1/ and below), never a cache root the user pointed at."""
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
        if not tighten_existing:
            return
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        _private_dir(path, tighten_existing)
        return
    if (path.stat().st_mode & 0o777) != DIR_MODE:
        os.chmod(path, DIR_MODE)


class DiskTier:
    name = "disk"

    def __init__(self, root: str | Path, max_bytes: int, clock=time.time) -> None:
        self.root = Path(root).expanduser() / "v1"
        self.max_bytes = max_bytes
        self.clock = clock  # wall clock: expiries survive restarts
        self._index: OrderedDict[bytes, tuple[int, float | None]] = OrderedDict()  # LRU first: size, expiry
        self._bytes = 0
        self._lock = threading.Lock()
        self._stats = TierStats(self.name)
        self._warned = False
        try:
            _private_dir(self.root.parent, tighten_existing=False)
            _private_dir(self.root)
            self._scan()
        except OSError as exc:
            self._warn(f"disk cache {self.root} is unusable: {exc}")

    # -- helpers ---------------------------------------------------------------------------------
    def _path(self, block_hash: bytes) -> Path:
        h = block_hash.hex()
        return self.root / h[:2] / f"{h}.kv"

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s (further disk tier errors are counted, not logged)", message)

    def _scan(self) -> None:
        """Rebuild the index from the files of an earlier run, oldest use first; drop stray temp files."""
        found = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.suffix == ".tmp":
                    f.unlink(missing_ok=True)
                    continue
                if f.suffix != ".kv":
                    continue
                try:
                    block_hash = bytes.fromhex(f.stem)
                    st = f.stat()
                    with open(f, "rb") as fh:
                        header, _ = read_header(fh.read(4096))
                    expires_at = header.get("expires_at")
                except (ValueError, OSError, CorruptEntryError):
                    f.unlink(missing_ok=True)
                    self._stats.num_corrupt += 1
                    continue
                found.append((st.st_mtime, block_hash, st.st_size, expires_at))
        for _, block_hash, size, expires_at in sorted(found):
            self._index[block_hash] = (size, expires_at)
            self._bytes += size

    def _drop(self, block_hash: bytes) -> None:
        item = self._index.pop(block_hash, None)
        if item is not None:
            self._bytes -= item[0]
        try:
            self._path(block_hash).unlink(missing_ok=True)
        except OSError:
            pass

    def _live(self, block_hash: bytes) -> bool:
        item = self._index.get(block_hash)
        if item is None:  # another process may have written it (same directory)
            path = self._path(block_hash)
            try:
                size = path.stat().st_size
            except OSError:
                return False
            item = self._index[block_hash] = (size, None)
            self._bytes += size
        if item[1] is not None and item[1] <= self.clock():
            self._drop(block_hash)
            self._stats.num_expired += 1
            return False
        return True

    # -- Tier ------------------------------------------------------------------------------------
    def contains(self, block_hash: bytes) -> bool:
        with self._lock:
            return self._live(block_hash)

    def get(self, block_hash: bytes) -> bytes | None:
        start = time.perf_counter()
        with self._lock:
            if not self._live(block_hash):
                self._stats.num_misses += 1
                return None
            self._index.move_to_end(block_hash)
        path = self._path(block_hash)
        try:
            data = path.read_bytes()
            os.utime(path)  # the LRU order survives restarts
        except OSError:
            with self._lock:
                self._drop(block_hash)
                self._stats.num_failed_reads += 1
                self._stats.num_misses += 1
            return None
        with self._lock:
            self._stats.num_hits += 1
            self._stats.load_seconds += time.perf_counter() - start
        return data

    def put(self, block_hash: bytes, entry: bytes, ttl_s: float | None) -> bool:
        size = len(entry)
        expires_at = None if ttl_s is None else self.clock() + ttl_s
        with self._lock:
            if size > self.max_bytes:
                self._stats.num_refused_writes += 1
                return False
            old = self._index.pop(block_hash, None)
            if old is not None:
                self._bytes -= old[0]
            while self._index and self._bytes + size > self.max_bytes:
                self._drop(next(iter(self._index)))
        path = self._path(block_hash)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            if not path.parent.is_dir():
                _private_dir(path.parent)
            fd = os.open(tmp, _OPEN_FLAGS, FILE_MODE)
            with os.fdopen(fd, "wb") as fh:
                if (os.fstat(fd).st_mode & 0o777) != FILE_MODE:  # a leftover temp file, or an odd umask
                    os.fchmod(fd, FILE_MODE)
                fh.write(entry)
            os.replace(tmp, path)
        except OSError as exc:  # disk full, read-only or removed directory
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            with self._lock:
                self._stats.num_refused_writes += 1
            self._warn(f"disk cache write to {self.root} failed: {exc}")
            return False
        with self._lock:
            self._index[block_hash] = (size, expires_at)
            self._bytes += size
            self._stats.num_writes += 1
        return True

    def delete(self, block_hash: bytes) -> None:
        with self._lock:
            self._drop(block_hash)

    def sweep(self) -> int:
        """Remove expired entries; returns how many."""
        now = self.clock()
        with self._lock:
            expired = [h for h, (_, exp) in self._index.items() if exp is not None and exp <= now]
            for h in expired:
                self._drop(h)
            self._stats.num_expired += len(expired)
        return len(expired)

    def stats(self) -> TierStats:
        with self._lock:
            s = TierStats(**self._stats.__dict__)
            s.num_entries, s.num_bytes = len(self._index), self._bytes
            return s

    def close(self) -> None:
        pass

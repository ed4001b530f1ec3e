"""The disk tier, the entry format and reuse through the tiers: exact after a restart, damaged entries
never used, tenants isolated, faults (full or unusable disk, killed writer) absorbed."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import our_model, tiny_hf_model

from promptstash.cache.hashing import extend_hashes, root_hash
from promptstash.cache.tiers.disk import DiskTier
from promptstash.cache.tiers.entry import CorruptEntryError, EntryMeta, decode, encode, read_header
from promptstash.config import EngineConfig
from promptstash.engine.engine import DEFAULT_NAMESPACE, Engine

META = EntryMeta(model_id="m@1", kv_layout="bs4/float32", num_layers=2, shape=(2, 2, 4, 1, 2), dtype="float32",
                 num_tokens=4)
H = bytes(range(16))


def payload(seed: int = 0) -> bytes:
    return torch.arange(META.payload_bytes // 4, dtype=torch.float32).add(seed).numpy().tobytes()


# -- entry format --------------------------------------------------------------------------------
def test_entry_round_trip() -> None:
    data = encode(H, META, payload(), expires_at=None)
    assert bytes(decode(data, H, META)) == payload()


@pytest.mark.parametrize("damage", ["truncated", "bit_flip", "wrong_model", "wrong_shape", "wrong_hash", "garbage"])
def test_damaged_entry_is_detected(damage: str) -> None:
    data = bytearray(encode(H, META, payload(), expires_at=None))
    meta, block_hash = META, H
    if damage == "truncated":
        data = data[:-7]
    elif damage == "bit_flip":
        data[-3] ^= 0x10
    elif damage == "wrong_model":
        meta = EntryMeta(**{**META.__dict__, "model_id": "other@2"})
    elif damage == "wrong_shape":
        meta = EntryMeta(**{**META.__dict__, "shape": (2, 2, 4, 2, 1)})
    elif damage == "wrong_hash":
        block_hash = bytes(16)
    else:
        data = bytearray(b"hello")
    with pytest.raises(CorruptEntryError):
        decode(bytes(data), block_hash, meta)


# -- disk tier -----------------------------------------------------------------------------------
def test_disk_tier_keeps_entries_across_instances_and_evicts_lru_within_its_cap(tmp_path) -> None:
    entry = encode(H, META, payload(), None)
    cap = 3 * len(entry) + 10
    tier = DiskTier(tmp_path, cap)
    hashes = [bytes([i]) * 16 for i in range(4)]
    for h in hashes[:3]:
        assert tier.put(h, entry, None)
    assert tier.get(hashes[0]) == entry  # now the most recently used
    assert tier.put(hashes[3], entry, None)  # evicts hashes[1], the least recently used
    assert not tier.contains(hashes[1]) and tier.contains(hashes[0])
    assert tier.stats().num_bytes <= cap
    again = DiskTier(tmp_path, cap)  # a restart: the index is rebuilt from the files
    assert {h for h in hashes if again.contains(h)} == {hashes[0], hashes[2], hashes[3]}
    assert again.get(hashes[2]) == entry


def test_disk_tier_expires_entries_lazily_and_by_sweep(tmp_path) -> None:
    now = [1000.0]
    tier = DiskTier(tmp_path, 1 << 20, clock=lambda: now[0])
    entry = encode(H, META, payload(), None)
    tier.put(b"a" * 16, entry, ttl_s=300)
    tier.put(b"b" * 16, entry, ttl_s=3600)
    tier.put(b"c" * 16, entry, ttl_s=None)
    now[0] += 301
    assert tier.get(b"a" * 16) is None  # lazily
    now[0] += 3600
    assert tier.sweep() == 1  # b
    assert tier.contains(b"c" * 16) and tier.stats().num_entries == 1 and tier.stats().num_expired == 2


def test_unusable_cache_directory_refuses_writes_without_raising(tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    tier = DiskTier(blocker, 1 << 20)
    assert not tier.put(H, encode(H, META, payload(), None), None)
    assert tier.get(H) is None
    assert tier.stats().num_refused_writes == 1


def test_full_disk_refuses_writes_and_counts_them(tmp_path) -> None:
    tier = DiskTier(tmp_path, 1 << 30)
    entry = encode(H, META, payload(), None)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(entry) // 2, hard))  # the OS refuses bigger files: EFBIG
    try:
        stored = tier.put(H, entry, None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert not stored and tier.stats().num_refused_writes == 1
    assert not tier.contains(H) and not list(tmp_path.rglob("*.tmp"))


def test_process_killed_during_a_write_leaves_no_valid_entry(tmp_path) -> None:
    code = f"""
import os, sys
sys.path.insert(0, {str(os.path.dirname(__file__))!r})
from promptstash.cache.tiers import disk
tier = disk.DiskTier({str(tmp_path)!r}, 1 << 20)
real_replace = os.replace
def die(*a): os._exit(9)  # killed after writing the temp file, before the rename
os.replace = die
tier.put(bytes(16), b"PSKV" + b"x" * 100, None)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert result.returncode == 9
    assert list(tmp_path.rglob("*.tmp"))  # the half-done write is there ...
    tier = DiskTier(tmp_path, 1 << 20)
    assert not tier.contains(bytes(16)) and not list(tmp_path.rglob("*.tmp"))  # ... and cleaned, never read


def test_disk_tier_files_are_created_0600_and_directories_0700(tmp_path) -> None:
    """KV entries are users' prompts: under a permissive umask (022) they must still not be group/world readable."""
    old_umask = os.umask(0o022)
    try:
        root = tmp_path / "kv"
        tier = DiskTier(root, 1 << 20)
        entry = encode(H, META, payload(), None)
        assert tier.put(H, entry, None) and tier.put(b"\xab" * 16, entry, None)
        files = list(root.rglob("*.kv"))
        dirs = [root, root / "v1", *[d for d in (root / "v1").iterdir() if d.is_dir()]]
        assert len(files) == 2 and len(dirs) == 4  # root, v1/ and two 2-hex-digit subdirectories
        assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}
        assert {str(d): d.stat().st_mode & 0o777 for d in dirs} == {str(d): 0o700 for d in dirs}
        # a cache root the user already made keeps its mode; what the tier creates inside it is private
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o755)
        assert DiskTier(shared, 1 << 20).put(H, entry, None)
        assert shared.stat().st_mode & 0o777 == 0o755
        assert (shared / "v1").stat().st_mode & 0o777 == 0o700
        assert all(f.stat().st_mode & 0o777 == 0o600 for f in shared.rglob("*.kv"))
    finally:
        os.umask(old_umask)


# -- reuse through the tiers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights():
    return our_model(tiny_hf_model("qwen2"))


def tiered_engine(model, disk_dir, **options) -> Engine:
    options.setdefault("kv_cache_tokens", 1024)
    config = EngineConfig(dtype="float32", max_prefill_tokens=64, kv_disk_dir=str(disk_dir), **options)
    return Engine(model, None, config, model_id="tiny-qwen2@test")


PROMPT = [(i * 7 + 3) % 256 for i in range(300)]


def test_restart_serves_the_prefix_from_disk_with_exact_logits(weights, tmp_path) -> None:
    first = tiered_engine(weights, tmp_path)
    cold = first.prompt_logits(PROMPT)
    first.close()
    second = tiered_engine(weights, tmp_path)  # a new process would see the same files
    warm = second.prompt_logits(PROMPT + [5, 6, 7])
    assert warm.num_cached_tokens == 288  # 18 full blocks of 16, all from disk
    assert {t.name: t.num_loaded_blocks for t in second.stats().tiers} == {"disk": 18}
    ref = tiered_engine(weights, tmp_path / "empty", enable_prefix_caching=False).prompt_logits(PROMPT + [5, 6, 7])
    torch.testing.assert_close(warm.logits, ref.logits[288:], atol=1e-4, rtol=0)
    assert cold.num_cached_tokens == 0
    out_hit = second.generate(PROMPT, max_tokens=8)
    out_ref = Engine(weights, None, EngineConfig(dtype="float32", enable_prefix_caching=False), "x").generate(
        PROMPT, max_tokens=8)
    assert out_hit.token_ids == out_ref.token_ids
    second.check_integrity()
    second.close()


def test_evicted_blocks_come_back_from_disk(weights, tmp_path) -> None:
    engine = tiered_engine(weights, tmp_path, kv_cache_tokens=512)  # 32 blocks: the prompt is 18
    engine.generate(PROMPT, max_tokens=1)
    engine.flush_tiers()
    engine.generate([(i * 11 + 1) % 256 for i in range(480)], max_tokens=1)  # evicts PROMPT's blocks
    assert engine.stats().cache.num_evictions > 0
    again = engine.generate(PROMPT, max_tokens=1)
    assert again.usage.cached_tokens == 288 and engine.stats().cache.num_loaded_blocks >= 1
    engine.check_integrity()
    engine.close()


@pytest.mark.parametrize("damage", ["truncate", "bit_flip", "garbage", "wrong_model", "wrong_shape"])
def test_damaged_disk_entry_is_deleted_and_recomputed_exactly(weights, tmp_path, damage: str) -> None:
    first = tiered_engine(weights, tmp_path)
    first.generate(PROMPT, max_tokens=1)
    first.close()
    assert len(list(tmp_path.rglob("*.kv"))) == 18
    hashes: list[bytes] = []
    extend_hashes(hashes, root_hash(first.model_id, first.cache.kv_layout, DEFAULT_NAMESPACE), PROMPT, 16)
    victim = next(tmp_path.rglob(f"{hashes[5].hex()}.kv"))
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bit_flip":
        data[-100] ^= 0x01
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:  # a well-formed entry of another model, or of another shape, under this name
        meta = first.kv_store.meta
        meta = EntryMeta(**{**meta.__dict__, "model_id": "another@model"}) if damage == "wrong_model" else \
            EntryMeta(**{**meta.__dict__, "shape": (2, meta.num_layers, 8, 2, meta.shape[-1] * 2)})
        data = bytearray(encode(bytes.fromhex(victim.stem), meta, bytes(meta.payload_bytes), None))
    victim.write_bytes(bytes(data))
    second = tiered_engine(weights, tmp_path)
    logits = second.prompt_logits(PROMPT)
    ref = tiered_engine(weights, tmp_path / "ref", enable_prefix_caching=False).prompt_logits(PROMPT)
    # blocks before the damaged one are loaded; the damaged one and all after are recomputed
    assert logits.num_cached_tokens == 5 * 16
    # caught when read (checksum, header fields), or already at start-up when the header is unreadable
    assert second.stats().tiers[0].num_corrupt == 1
    torch.testing.assert_close(logits.logits, ref.logits[logits.num_cached_tokens:], atol=1e-4, rtol=0)
    second.flush_tiers()
    assert not victim.exists() or victim.read_bytes() != bytes(data)  # deleted (then rewritten when recomputed)
    second.check_integrity()


def test_tenants_never_load_each_others_blocks_from_disk(weights, tmp_path) -> None:
    a = tiered_engine(weights, tmp_path)
    a.generate(PROMPT, max_tokens=1, namespace="tenant=a")
    a.close()
    b = tiered_engine(weights, tmp_path)
    assert b.generate(PROMPT, max_tokens=1, namespace="tenant=b").usage.cached_tokens == 0
    assert all(t.num_loaded_blocks == 0 for t in b.stats().tiers)
    assert b.generate(PROMPT, max_tokens=1, namespace="tenant=a").usage.cached_tokens == 288


def test_bfloat16_storage_halves_the_bytes_of_float32_kv(weights, tmp_path) -> None:
    full = tiered_engine(weights, tmp_path / "fp32")
    half = tiered_engine(weights, tmp_path / "bf16", kv_storage_dtype="bfloat16")
    for engine in (full, half):
        engine.generate(PROMPT, max_tokens=1)
        engine.close()
    size = {name: sum(f.stat().st_size for f in (tmp_path / name).rglob("*.kv")) for name in ("fp32", "bf16")}
    assert size["bf16"] < 0.52 * size["fp32"]
    again = tiered_engine(weights, tmp_path / "bf16", kv_storage_dtype="bfloat16")
    assert again.generate(PROMPT, max_tokens=1).usage.cached_tokens == 288  # loads (approximately) back


def test_long_ttl_class_is_written_with_its_expiry(weights, tmp_path) -> None:
    engine = tiered_engine(weights, tmp_path)
    rid = engine.add_request(PROMPT, cache_breakpoints=[(160, "24h")])
    engine.run_until_done([rid])
    engine.close()
    headers = [read_header(f.read_bytes())[0] for f in tmp_path.rglob("*.kv")]
    with_expiry = [h for h in headers if h["expires_at"] is not None]
    assert len(with_expiry) == 10  # the 10 protected blocks of the 160-token prefix
    assert all(h["expires_at"] > time.time() + 86000 for h in with_expiry)


def test_read_only_cache_directory_refuses_writes_without_raising(tmp_path) -> None:
    """A real read-only filesystem (a tmpfs mounted ro); root ignores permission bits, so chmod would not do."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a read-only tmpfs here (needs root); the unusable-directory test covers the path")
    try:
        tier = DiskTier(target, 1 << 20)
        assert not tier.put(H, encode(H, META, payload(), None), None)
        assert tier.get(H) is None and tier.stats().num_refused_writes == 1
    finally:
        subprocess.run(["umount", str(target)], check=False)


def test_bfloat16_pool_blocks_load_from_disk_bit_exactly(tmp_path) -> None:
    """Loads copy bfloat16 entries into the pool as raw 16-bit words: the logits equal a pool hit's exactly."""
    weights = our_model(tiny_hf_model("qwen2"), dtype=torch.bfloat16)
    config = EngineConfig(dtype="bfloat16", max_prefill_tokens=64, kv_cache_tokens=2048, kv_disk_dir=str(tmp_path))
    first = Engine(weights, None, config, "tiny-bf16")
    first.generate(PROMPT, max_tokens=1)
    pool_hit = first.prompt_logits(PROMPT + [1, 2])
    first.close()
    second = Engine(weights, None, config, "tiny-bf16")
    from_disk = second.prompt_logits(PROMPT + [1, 2])
    assert pool_hit.num_cached_tokens == from_disk.num_cached_tokens == 288
    assert second.stats().tiers[0].num_loaded_blocks == 18
    assert torch.equal(pool_hit.logits, from_disk.logits)
    second.close()

"""Cache sizes read from a sysfs-like tree (the real one differs per machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from admmcompress import cpu_caches


def _cache(root: Path, index: int, level: int, kind: str, size: str) -> None:
    folder = root / f"index{index}"
    folder.mkdir(parents=True)
    (folder / "level").write_text(f"{level}\n")
    (folder / "type").write_text(f"{kind}\n")
    (folder / "size").write_text(f"{size}\n")


def test_sizes_and_l3_from_sysfs(tmp_path):
    _cache(tmp_path, 0, 1, "Data", "48K")
    _cache(tmp_path, 1, 1, "Instruction", "32K")
    _cache(tmp_path, 2, 2, "Unified", "2048K")
    _cache(tmp_path, 3, 3, "Unified", "260M")
    assert cpu_caches.l3_bytes(tmp_path) == 260 << 20
    assert cpu_caches.cache_sizes(tmp_path) == "L1d 48K, L1i 32K, L2 2048K, L3 260M"


def test_no_l3_in_sysfs_falls_back_to_lscpu(tmp_path, monkeypatch):
    _cache(tmp_path, 0, 2, "Unified", "1024K")

    class Done:
        stdout = "L2 cache:  2 MiB (2 instances)\nL3 cache:  32 MiB (1 instance)\n"

    monkeypatch.setattr(cpu_caches.subprocess, "run", lambda *a, **k: Done())
    assert cpu_caches.l3_bytes(tmp_path) == 32 << 20

    def missing(*a, **k):
        raise FileNotFoundError("lscpu")

    monkeypatch.setattr(cpu_caches.subprocess, "run", missing)
    assert cpu_caches.l3_bytes(tmp_path) == 0
    assert cpu_caches.cache_sizes(tmp_path / "none") == "unknown (no sysfs cache entries)"


def test_unreadable_size_is_skipped(tmp_path, monkeypatch):
    _cache(tmp_path, 3, 3, "Unified", "lots")
    monkeypatch.setattr(cpu_caches.subprocess, "run", lambda *a, **k: type("D", (), {"stdout": ""})())
    assert cpu_caches.l3_bytes(tmp_path) == 0
    with pytest.raises(ValueError):
        cpu_caches.parse_size("12Q")

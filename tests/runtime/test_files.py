"""Atomic writes: nothing half-written survives a failure, and finished files look like ordinary files."""

from __future__ import annotations

import os
import stat

import pytest

from dtk.runtime.files import atomic_dir, atomic_path, sha256, write_text


def test_atomic_path_renames_on_success_with_usual_permissions(tmp_path):
    target = tmp_path / "sub" / "grid.png"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"png")
    assert target.read_bytes() == b"png"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert list(target.parent.iterdir()) == [target]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model.pt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_old_bundle_only_on_success(tmp_path):
    bundle = tmp_path / "bundle"
    with atomic_dir(bundle) as tmp:
        write_text(tmp / "dtk.json", "old")
    with pytest.raises(RuntimeError), atomic_dir(bundle) as tmp:
        write_text(tmp / "dtk.json", "new")
        raise RuntimeError("parity failed")
    assert (bundle / "dtk.json").read_text() == "old"
    with atomic_dir(bundle) as tmp:
        write_text(tmp / "dtk.json", "new")
    assert (bundle / "dtk.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_sha256_pins_a_known_digest(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_the_next_writer_removes_what_a_killed_one_left(tmp_path):
    target = tmp_path / "model.pt"
    (tmp_path / ".model.pt.abc123de.partial").write_bytes(b"half a checkpoint")
    (tmp_path / ".model.pt.lock").write_bytes(b"")  # a killed writer's lock: flock is gone with it
    (tmp_path / ".other.pt.x.partial").write_bytes(b"not ours")
    write_text(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.x.partial", "model.pt"]


def test_a_held_lock_makes_the_second_writer_wait(tmp_path):
    import threading

    from dtk.runtime.files import locked

    bundle, events = tmp_path / "bundle", []
    with locked(bundle):
        writer = threading.Thread(target=lambda: _write_dir(bundle, events))
        writer.start()
        writer.join(timeout=1.0)
        assert writer.is_alive() and events == ["waiting"]  # blocked on the lock, nothing written
        assert not bundle.exists()
    writer.join(timeout=10)
    assert events == ["waiting", "written"] and (bundle / "dtk.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def _write_dir(bundle, events):
    with atomic_dir(bundle, on_wait=lambda: events.append("waiting")) as tmp:
        write_text(tmp / "dtk.json", "new")
    events.append("written")


def test_atomic_dir_follows_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "bundle") as tmp:
            write_text(tmp / "dtk.json", "{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "bundle").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "bundle" / "dtk.json").stat().st_mode) == 0o640


def test_cleanup_spares_a_similar_names_temporaries(tmp_path):
    live = tmp_path / ".bundle.v2.k3j4h5g6.partial"  # `-o bundle.v2` being written right now
    live.mkdir()
    with atomic_dir(tmp_path / "bundle") as tmp:
        write_text(tmp / "dtk.json", "{}")
    assert live.is_dir()

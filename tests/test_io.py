"""The one atomic write (core/io.py): all or nothing, and files get the permissions a plain open would give."""

import os
import stat

import pytest

from src.detection.core.io import atomic_paths, atomic_write, write_text_atomic


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        written = write_text_atomic(tmp_path / "atomic.txt", "x")
        with atomic_paths(tmp_path / "a.onnx", tmp_path / "a.onnx.json") as (onnx, sidecar):
            onnx.write_bytes(b"1")
            sidecar.write_text("{}")
    finally:
        os.umask(old)
    assert _mode(written) == _mode(plain) == 0o666 & ~umask
    assert _mode(tmp_path / "a.onnx") == _mode(tmp_path / "a.onnx.json") == 0o666 & ~umask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "best_model.pth"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"new, half written")
        raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pth"]
    with pytest.raises(RuntimeError), atomic_paths(tmp_path / "m.onnx", tmp_path / "m.onnx.json") as (a, b):
        a.write_bytes(b"1")
        raise RuntimeError("export failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best_model.pth"]

"""Output files: one atomic writer (fsync, normal permissions, nothing left on error) and one up-front check."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from renorm import files
from renorm.errors import RenormError
from renorm.report import write_json_atomic


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        files.write_atomic(tmp_path / "a.bin", lambda handle: handle.write(b"x"))
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.bin") == 0o644
    assert mode(tmp_path / "r.json") == 0o644


def test_mode_follows_a_stricter_umask(tmp_path, umask_027):
    files.write_atomic(tmp_path / "a.bin", lambda handle: handle.write(b"x"))
    assert mode(tmp_path / "a.bin") == 0o640


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1])
    size = files.write_atomic(tmp_path / "m.pt", lambda handle: torch.save({"w": torch.ones(3)}, handle))
    assert events[:2] == ["fsync", "rename"]
    assert size == (tmp_path / "m.pt").stat().st_size
    assert torch.equal(torch.load(tmp_path / "m.pt", weights_only=True)["w"], torch.ones(3))


def test_an_error_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "out.json").write_text("old")

    def fail(handle):
        handle.write(b"half")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        files.write_atomic(tmp_path / "out.json", fail)
    assert (tmp_path / "out.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_check_output_refuses_folders_missing_folders_and_inputs(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"model")
    with pytest.raises(RenormError, match="is a folder"):
        files.check_output(tmp_path, "--out")
    with pytest.raises(RenormError, match="does not exist; create it first"):
        files.check_output(tmp_path / "missing" / "x.pt", "--out")
    (tmp_path / "link.pt").symlink_to(tmp_path / "model.pt")
    for alias in (tmp_path / "model.pt", tmp_path / "link.pt", tmp_path / "." / "model.pt"):
        with pytest.raises(RenormError, match="is an input of this run"):
            files.check_output(alias, "--out", [tmp_path / "model.pt"])
    files.check_output(tmp_path / "new.pt", "--out", [tmp_path / "model.pt"])  # fine, and leaves nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.pt", "model.pt"]


def test_check_output_refuses_a_folder_that_takes_no_files(tmp_path):
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
    else:  # root writes anywhere but in read-only file systems
        locked = Path("/sys")
        if not locked.is_dir() or os.access(locked, os.W_OK) and _writable(locked):
            pytest.skip("no folder here refuses new files to this user")
    with pytest.raises(RenormError, match="cannot write in"):
        files.check_output(locked / "out.pt", "--out")


def _writable(folder: Path) -> bool:
    try:
        (folder / ".renorm-probe").touch()
    except OSError:
        return False
    (folder / ".renorm-probe").unlink()
    return True

import errno
import os
import signal
import stat
import subprocess
import sys

import pytest

from ctfreid._atomic import atomic_write


def test_atomic_write_replaces_and_uses_umask_permissions(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    old = os.umask(0o022)
    try:
        with atomic_write(target) as f:
            f.write(b"new")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as f:
            f.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_write_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_write(tmp_path / "nope" / "x.bin"):
            pass


def test_atomic_write_keeps_a_private_mode_and_updates_a_symlink_target(tmp_path):
    target = tmp_path / "private.ctf"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    link = tmp_path / "link.ctf"
    link.symlink_to(target)
    with atomic_write(link) as f:
        f.write(b"new")
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_full_disk_names_the_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")

    class Full(RuntimeError):
        pass

    with pytest.raises(OSError, match=r"cannot write .*ckpt.pt: No space left on device") as info:
        with atomic_write(target) as f:
            f.write(b"x")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as e:  # as torch.save reports it: a RuntimeError chained to the OSError
                raise Full("PytorchStreamWriter failed writing file") from e
    assert info.value.errno == errno.ENOSPC and ".tmp" not in str(info.value)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_temporaries_of_a_killed_writer_are_cleaned_up(tmp_path):
    target = tmp_path / "g.ctf"
    code = ("import sys, os, time; from ctfreid._atomic import atomic_write\n"
            "with atomic_write(sys.argv[1]) as f:\n"
            "    f.write(b'x' * 1000); f.flush(); print('writing', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".g.ctf.") and left[0].endswith(".tmp")
    with atomic_write(target) as f:
        f.write(b"done")
    assert [p.name for p in tmp_path.iterdir()] == ["g.ctf"]


def test_a_directory_as_target_is_named(tmp_path):
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        with atomic_write(tmp_path):
            pass


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    """Power-loss durability of the rename: the folder's entry is fsynced after the file replaced the target
    (checked by recording what each fsync saw, since a power cut cannot be made here)."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    seen = []
    real = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        seen.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", os.readlink(f"/proc/self/fd/{fd}"),
                     target.read_bytes()))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with atomic_write(target) as f:
        f.write(b"new")
    assert [(kind, content) for kind, _, content in seen] == [("file", b"old"), ("dir", b"new")]
    assert seen[1][1] == str(tmp_path)

"""Hardening of files: the index lock with real processes, no lock litter beside a wrong --index, links,
devices and FIFOs named for what they are, atomic_write's messages, and Pillow's bomb warning."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ctfreid._atomic import atomic_write
from ctfreid.cli import main
from ctfreid.errors import CtfreidError
from ctfreid.infer import gallery

# A writer that loads a counter, waits (as 'index add' does while encoding) and saves counter + 1.
_INCREMENT = """
import sys, time
from pathlib import Path
from ctfreid._atomic import atomic_write
from ctfreid.infer.gallery import index_lock
path = Path(sys.argv[1])
with index_lock(path):
    value = int(path.read_text())
    print("locked", flush=True)
    time.sleep(0.5)
    with atomic_write(path, "w") as f:
        f.write(str(value + 1))
"""

# Holds the lock of argv[1] until the file argv[2] appears, then writes argv[3] and releases it.
_HOLD = """
import sys, time
from pathlib import Path
from ctfreid.infer.gallery import index_lock
with index_lock(sys.argv[1]):
    print("held", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.02)
    time.sleep(0.3)
    Path(sys.argv[3]).write_text("released")
"""


def _python(code: str, *argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], stdout=subprocess.PIPE, text=True)


def test_writers_holding_the_index_lock_lose_no_update(tmp_path):
    counter = tmp_path / "g.ctf"
    counter.write_text("0")
    procs = [_python(_INCREMENT, counter) for _ in range(3)]
    for p in procs:
        p.communicate(timeout=120)
        assert p.returncode == 0
    assert counter.read_text() == "3"  # unlocked, the sleeping writers would each save 1


def test_a_link_to_an_index_takes_the_lock_of_its_target(tmp_path):
    target, link = tmp_path / "g.ctf", tmp_path / "link.ctf"
    target.write_bytes(b"index")
    link.symlink_to(target)
    go, released = tmp_path / "go", tmp_path / "released"
    holder = _python(_HOLD, target, go, released)
    assert holder.stdout.readline().strip() == "held"
    go.touch()
    with gallery.index_lock(link):  # must wait for the holder of the target's lock
        assert released.exists()
    holder.communicate(timeout=60)
    assert not (tmp_path / "link.ctf.lock").exists()


def test_an_unusable_lock_file_is_one_error_naming_the_index(tmp_path, capsys):
    index = tmp_path / "g.ctf"
    index.write_bytes(b"index")
    (tmp_path / "g.ctf.lock").mkdir()  # as a read-only folder would, the lock cannot be opened
    with pytest.raises(OSError, match=r"cannot lock .*g\.ctf for writing: its lock file .*g\.ctf\.lock: Is a directory"), \
            gallery.index_lock(index):
        pass
    rc = main(["index", "add", "--index", str(index), "--model", str(tmp_path / "no-run"), "--images", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "cannot lock" in err, err


def test_a_wrong_index_leaves_no_lock_file_beside_it(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    for index in (tmp_path / "missing.ctf", tmp_path / "adir"):
        rc = main(["index", "add", "--index", str(index), "--model", str(tmp_path / "no-run"),
                   "--images", str(tmp_path)])
        err = capsys.readouterr().err
        assert rc == 2 and "--index" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir"]


def test_index_build_checks_again_under_the_lock(tmp_path, capsys, monkeypatch):
    """A concurrent 'index build' that wrote --out while this one waited for the lock is not overwritten."""
    out = tmp_path / "g.ctf"
    real = gallery.index_lock

    def racing(path):
        Path(path).write_bytes(b"the other build's index")  # done by the other writer while we waited
        return real(path)

    monkeypatch.setattr(gallery, "index_lock", racing)
    rc = main(["index", "build", "--model", str(tmp_path / "no-run"), "--images", str(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "exists: pass --overwrite" in err, err
    assert out.read_bytes() == b"the other build's index"


def test_fifos_devices_and_folders_are_named_for_what_they_are(tmp_path):
    from ctfreid.data.datasets import read_image
    from ctfreid.learn.run_dir import load_model

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # before: "does not exist" (and a FIFO opened for reading would block forever)
    for bad in (fifo, "/dev/null"):
        with pytest.raises(CtfreidError, match="not a regular file"):
            load_model(bad)
        with pytest.raises(CtfreidError, match="not a regular file"):
            read_image(bad)
        with pytest.raises(CtfreidError, match="not a regular file"):
            gallery.query_records([str(bad)])
        with pytest.raises(FileNotFoundError, match="is not a folder"):
            gallery.folder_records(bad)
    with pytest.raises(CtfreidError, match="is a directory"):
        read_image(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_image(tmp_path / "nope.jpg")


def test_pillows_bomb_warning_gives_way_to_our_one_line_error(tmp_path):
    from PIL import Image

    from ctfreid.data.datasets import read_image

    big = tmp_path / "big.png"
    Image.new("1", (10000, 10000)).save(big, optimize=True)  # 100 MP: Pillow warns (> 89 MP), does not refuse
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CtfreidError, match=r"big.png has 10000 x 10000 pixels"):
            read_image(big)
    assert not [w for w in caught if "DecompressionBomb" in w.category.__name__], caught


def test_atomic_write_keeps_errors_about_other_files(tmp_path):
    other = tmp_path / "input.bin"
    with pytest.raises(FileNotFoundError) as info, atomic_write(tmp_path / "out.bin") as f:
        f.write(other.read_bytes())  # the caller's own read fails: not a write error of out.bin
    assert "input.bin" in str(info.value) and "cannot write" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_atomic_write_errors_name_the_link_the_user_gave(tmp_path):
    target = tmp_path / "real" / "g.ctf"
    target.parent.mkdir()
    target.write_bytes(b"old")
    link = tmp_path / "g.ctf"
    link.symlink_to(target)
    with pytest.raises(OSError, match=r"cannot write .*/g\.ctf: No space left on device") as info, atomic_write(link):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert "real" not in str(info.value) and info.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["g.ctf"]


def test_atomic_write_never_changes_the_process_umask(tmp_path, monkeypatch):
    """Setting the umask to 0 and back, even briefly, makes files of other threads world-writable."""
    old = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError(f"os.umask({mask:o}) called by atomic_write")

        monkeypatch.setattr(os, "umask", no_umask)
        with atomic_write(tmp_path / "new.bin") as f:
            f.write(b"x")
        monkeypatch.undo()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o640  # 0666 & ~0027, as open() gives

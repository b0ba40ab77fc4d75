"""megatron_var.common.atomic: a file or directory is replaced whole or not at all, and an error leaves the old
one intact with no temporary behind."""

import os
import stat

import pytest
import torch

from megatron_var.common import atomic


class Boom(Exception):
    pass


def _leftovers(directory, name):
    return sorted(p.name for p in directory.iterdir() if p.name != name and p.name.startswith(name))


def test_write_text_replaces_the_content(tmp_path):
    p = tmp_path / "f.json"
    atomic.atomic_write_text(p, "old\n")
    atomic.atomic_write_text(p, "new\n")
    assert p.read_text() == "new\n" and _leftovers(tmp_path, "f.json") == []


def test_file_mode_follows_the_umask_like_open(tmp_path):
    ref = tmp_path / "ref"
    ref.write_text("x")
    atomic.atomic_write_text(tmp_path / "f", "x")
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == stat.S_IMODE(ref.stat().st_mode)


def test_bytes_and_torch_save(tmp_path):
    atomic.atomic_write_bytes(tmp_path / "b", b"\x00\x01")
    assert (tmp_path / "b").read_bytes() == b"\x00\x01"
    atomic.atomic_torch_save({"t": torch.arange(3)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["t"], torch.arange(3))
    assert _leftovers(tmp_path, "t.pt") == []


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_failure_mid_write_keeps_the_old_file_and_no_tmp(tmp_path, exc):
    p = tmp_path / "f.txt"
    p.write_text("old")
    with pytest.raises(exc):
        with atomic.atomic_write(p) as f:
            f.write("half of the new cont")
            f.flush()
            assert _leftovers(tmp_path, "f.txt")  # the temporary exists next to the file while writing
            raise exc()
    assert p.read_text() == "old" and _leftovers(tmp_path, "f.txt") == []


def test_failure_on_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic.atomic_write(tmp_path / "new.bin", "wb") as f:
            f.write(b"x")
            raise Boom()
    assert list(tmp_path.iterdir()) == []


def test_concurrent_writers_use_distinct_temporaries(tmp_path):
    p = tmp_path / "f"
    with atomic.atomic_write(p) as a, atomic.atomic_write(p) as b:
        a.write("a")
        b.write("b")
    assert p.read_text() == "a" and _leftovers(tmp_path, "f") == []  # a was renamed last


def test_bad_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic.atomic_write(tmp_path / "f", "a"):
            pass


def test_directory_is_staged_next_to_dest_then_replaces_it(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "stale").write_text("old run")
    with atomic.atomic_directory(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest and not any(tmp.iterdir())
        (tmp / "a").write_text("new")
        assert (dest / "stale").exists()  # the old one is in place until the end
    assert sorted(p.name for p in dest.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_directory_error_leaves_no_partial_dir_and_keeps_the_old_one(tmp_path, exc):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old").write_text("kept")
    with pytest.raises(exc):
        with atomic.atomic_directory(dest) as tmp:
            (tmp / "part").write_text("partial")
            raise exc()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in dest.iterdir()) == ["old"]


def test_directory_error_on_a_new_dest_leaves_nothing(tmp_path):
    with pytest.raises(Boom):
        with atomic.atomic_directory(tmp_path / "sub" / "out") as tmp:
            (tmp / "part").write_text("partial")
            raise Boom()
    assert list((tmp_path / "sub").iterdir()) == []


def test_directory_without_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic.atomic_directory(tmp_path / "empty", overwrite=False) as tmp:  # an empty directory may be replaced
        (tmp / "a").write_text("x")
    assert (tmp_path / "empty" / "a").exists()
    with pytest.raises(FileExistsError):
        with atomic.atomic_directory(tmp_path / "empty", overwrite=False):
            pytest.fail("must not be entered")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_directory_with_a_given_staging_name_and_a_stale_one(tmp_path):
    staging = tmp_path / "iter_0000001.tmp"
    staging.mkdir()
    (staging / "from a crashed save").write_text("x")
    with atomic.atomic_directory(tmp_path / "iter_0000001", staging=staging) as tmp:
        assert tmp == staging and not any(tmp.iterdir())
        (tmp / "a").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001"]


def test_replace_directory_puts_the_old_one_back_when_the_rename_fails(tmp_path, monkeypatch):
    dest, staged = tmp_path / "out", tmp_path / "staged"
    dest.mkdir()
    (dest / "old").write_text("kept")
    staged.mkdir()
    real = os.replace

    def failing(src, dst):
        if str(src) == str(staged):
            raise OSError("disk gone")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing)
    with pytest.raises(OSError, match="disk gone"):
        atomic.replace_directory(staged, dest)
    assert (dest / "old").read_text() == "kept"

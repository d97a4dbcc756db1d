"""The change index on real directories: what it records, what survives a crash of the daemon, and
what it notices of changes made to the upper behind its back (no mount needed: the index is core)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import assert_journal_complete

from layerfs.core import journal as journal_module
from layerfs.core import whiteout
from layerfs.core.index import ChangeIndex, file_digest, read_index
from layerfs.core.journal import ChangeJournal


def _upper(root: Path) -> Path:
    upper = root / "upper"
    (upper / "etc/app").mkdir(parents=True)
    (upper / "etc/app/conf").write_text("red")
    (upper / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (upper / "a-b").mkdir()
    (upper / "a").mkdir()
    (upper / "a/b").write_text("b")
    os.symlink("/nowhere", upper / "link")
    whiteout.make_whiteout(str(upper / "gone"))
    (upper / "opq").mkdir()
    whiteout.mark_opaque(str(upper / "opq"))
    return upper


def _fields(index: ChangeIndex) -> dict:
    """Everything recorded but lazily computed digests."""
    return {p: r._replace(digest=None) for p, r in index.items()}


def _walked(upper: Path, tmp_path: Path) -> dict:
    """What a walk of the upper records (an index read from a state directory with nothing saved)."""
    with read_index(str(upper), str(tmp_path / "nothing-saved")) as index:
        assert index.rebuilt
        return _fields(index)


def _saved(upper: Path, state: Path) -> None:
    """An index of ``upper`` saved in ``state``, as a mount and its unmount leave it."""
    ChangeJournal(str(upper), str(state)).close()


def test_first_load_walks_the_upper_and_records_every_entry(tmp_path):
    upper = _upper(tmp_path)
    with read_index(str(upper), str(tmp_path / "state")) as index:
        assert index.rebuilt
        assert [p for p, _ in index.items()] == [
            "/",
            "/a",
            "/a/b",
            "/a-b",
            "/etc",
            "/etc/app",
            "/etc/app/conf",
            "/etc/hosts",
            "/gone",
            "/link",
            "/opq",
        ]
        assert index.get("/gone").is_whiteout and index.get("/opq").opaque and index.get("/link").target == "/nowhere"
        assert [p for p, _ in index.items("/a")] == ["/a", "/a/b"]  # not /a-b
        assert list(index.paths_below("/etc")) == ["/etc/app", "/etc/app/conf", "/etc/hosts"]
        assert index.digest("/etc/hosts") == file_digest(str(upper / "etc/hosts"))


def test_a_clean_close_is_loaded_back_without_a_walk(tmp_path):
    upper = _upper(tmp_path)
    _saved(upper, tmp_path / "state")
    with read_index(str(upper), str(tmp_path / "state")) as again:
        assert not again.rebuilt and not again.rescanned
        assert _fields(again) == _walked(upper, tmp_path)


def test_journaled_changes_survive_a_killed_daemon(tmp_path):
    upper = _upper(tmp_path)
    daemon = ChangeJournal(str(upper), str(tmp_path / "state"))
    # What the daemon does for each change: journal the path, then change the upper. It is "killed"
    # after changing the upper, before saving anything.
    for path in ("/etc/new", "/a/b", "/etc/hosts"):
        daemon.note(path)
    (upper / "etc/new").write_text("new")
    os.unlink(upper / "a/b")
    os.chmod(upper / "etc/hosts", 0o600)
    with read_index(str(upper), str(tmp_path / "state")) as after_crash:
        assert not after_crash.rebuilt
        assert _fields(after_crash) == _walked(upper, tmp_path)
        assert after_crash.get("/a/b") is None and after_crash.get("/etc/new").size == 3


@pytest.mark.parametrize(
    "change",
    [
        "add in dir",
        "new subtree",
        "content",
        "delete",
        "delete dir",
        "replace by dir",
        "dir swapped",
        "new in a dir and in its subdir",
        "opaque mark",
    ],
)
def test_changes_behind_its_back_are_noticed(tmp_path, change):
    upper = _upper(tmp_path)
    _saved(upper, tmp_path / "state")
    if change == "add in dir":
        (upper / "etc/app/other").write_text("x")
    elif change == "new subtree":
        (upper / "a/x/y/z").mkdir(parents=True)
        (upper / "a/x/y/z/f").write_text("deep")
    elif change == "content":
        (upper / "etc/hosts").write_text("127.0.0.1 changed\n")
    elif change == "delete":
        os.unlink(upper / "etc/app/conf")
    elif change == "delete dir":
        (upper / "a/b").unlink()
        (upper / "a").rmdir()
    elif change == "replace by dir":
        os.unlink(upper / "link")
        (upper / "link").mkdir()
        (upper / "link/f").write_text("f")
    elif change == "dir swapped":  # another directory (another inode) in its place, with other entries
        (upper / "fresh").mkdir()
        (upper / "fresh/other").write_text("o")
        (upper / "etc/app/conf").unlink()
        (upper / "etc/app").rmdir()
        os.rename(upper / "fresh", upper / "etc/app")
    elif change == "new in a dir and in its subdir":  # / read again, and /a for its own change
        (upper / "new").write_text("n")
        (upper / "a/late").write_text("l")
    elif change == "opaque mark":
        whiteout.mark_opaque(str(upper / "a"))
    with read_index(str(upper), str(tmp_path / "state")) as again:
        assert not again.rebuilt
        assert _fields(again) == _walked(upper, tmp_path)


def test_an_unreadable_snapshot_means_a_walk_not_a_wrong_answer(tmp_path):
    upper = _upper(tmp_path)
    _saved(upper, tmp_path / "state")
    (tmp_path / "state/records").write_text("{not json\n")
    (upper / "etc/late").write_text("late")
    with read_index(str(upper), str(tmp_path / "state")) as again:
        assert again.rebuilt and again.get("/etc/late") is not None


def test_a_directory_replaced_by_a_symlink_is_not_followed(tmp_path):
    upper = _upper(tmp_path)
    outside = tmp_path / "outside"
    (outside / "app").mkdir(parents=True)
    (outside / "app/conf").write_text("not in the upper")
    (outside / "secret").write_text("x")
    _saved(upper, tmp_path / "state")
    (upper / "etc/app/conf").unlink()
    (upper / "etc/app").rmdir()
    os.symlink(outside, upper / "etc/app")  # behind its back: a directory becomes a way out
    (journal_file,) = (tmp_path / "state").glob("journal-*")
    with open(journal_file, "a") as journal:
        journal.write("/etc/app/secret\n")  # as if a daemon had journaled a path below it, then died
    with read_index(str(upper), str(tmp_path / "state")) as again:
        assert again.get("/etc/app").target == str(outside)
        assert list(again.paths_below("/etc/app")) == []
        assert _fields(again) == _walked(upper, tmp_path)


def test_a_long_lived_daemon_compacts_its_journal_in_the_background(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_module, "_COMPACT_EVERY", 50)
    upper = _upper(tmp_path)
    daemon = ChangeJournal(str(upper), str(tmp_path / "state"))
    for i in range(400):  # what the union does: journal, then change the upper
        daemon.note(f"/etc/f{i}", "/etc")
        (upper / f"etc/f{i}").write_text(str(i))
        if i % 3 == 0:
            daemon.note(f"/etc/f{i - 1}")
            (upper / f"etc/f{i - 1}").unlink(missing_ok=True)
        if i % 97 == 0:  # a reader beside the daemon, as `layerfs diff` of a mount is
            with read_index(str(upper), str(tmp_path / "state")) as reader:
                assert _fields(reader) == _walked(upper, tmp_path)
    daemon.close()
    assert len(list((tmp_path / "state").glob("journal-*"))) <= 2  # (the last compaction's, at most)
    with read_index(str(upper), str(tmp_path / "state")) as again:
        assert again.generation > 2  # the mount's snapshot, then at least two compactions
        assert_journal_complete(again)
        assert _fields(again) == _walked(upper, tmp_path)

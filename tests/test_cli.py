"""The ``layerfs`` command and the daemon's life cycle, driven as its callers drive it.

Callers are a person's shell and containers-storage, which runs ``layerfs -o OPTIONS MERGED`` from
``<graphroot>/overlay``, waits for the exit and then uses the mount at once, and runs ``--version``.
Every test goes through the installed console script in a subprocess, and registers its mount point
with the ``mounts`` fixture so that it is unmounted even when the test fails.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import Mounts, errno_of, is_mounted
from processes import daemon_pids, open_files_under, pids_using, wait_for

import layerfs

LAYERFS = str(Path(sys.executable).with_name("layerfs"))  # the console script containers-storage runs


def layerfs_cmd(
    *args: str | os.PathLike, cwd: str | os.PathLike | None = None, **kwargs
) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    return subprocess.run([LAYERFS, *map(str, args)], cwd=cwd, text=True, timeout=60, **kwargs)


def cli_mount(mounts: Mounts, mnt: Path, *args: str | os.PathLike, cwd=None) -> subprocess.CompletedProcess:
    """Run ``layerfs ARGS`` that should mount ``mnt`` (registered first, so it is cleaned up)."""
    mnt.mkdir(parents=True, exist_ok=True)
    mounts.points.append(mnt)
    return layerfs_cmd(*args, cwd=cwd)


def assert_mounted_ok(result: subprocess.CompletedProcess, mnt: Path) -> None:
    assert result.returncode == 0, result.stderr
    # The caller uses the mount right after the exit: it must be the FUSE mount already, not the dir.
    assert is_mounted(mnt)
    assert os.stat(mnt).st_dev != os.stat(mnt.parent).st_dev


def assert_one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), result.stderr
    return lines[0]


def assert_daemon_exits(mnt: Path) -> None:
    assert wait_for(lambda: not daemon_pids(mnt)), f"layerfs daemon still running for {mnt}"


@pytest.fixture
def tree(layers) -> SimpleNamespace:
    """Two lowers with a file each and one they both have (the top one must win), an empty upper."""
    top, bottom = layers.dir("top"), layers.dir("bottom")
    (top / "shared").write_text("top\n")
    (bottom / "shared").write_text("bottom\n")
    (top / "from-top").write_text("t\n")
    (bottom / "from-bottom").write_text("b\n")
    return SimpleNamespace(
        top=top, bottom=bottom, upper=layers.dir("upper"), work=layers.dir("work"), lowerdir=f"lowerdir={top}:{bottom}"
    )


def assert_merged(mnt: Path) -> None:
    assert sorted(os.listdir(mnt)) == ["from-bottom", "from-top", "shared"]
    assert (mnt / "shared").read_text() == "top\n"


# -- calling forms ---------------------------------------------------------------------------------


def test_version():
    result = layerfs_cmd("--version")
    assert result.returncode == 0
    assert layerfs.__version__ in result.stdout


@pytest.mark.parametrize("form", [["mount"], []], ids=["mount-command", "fuse-overlayfs-form"])
def test_mount_is_usable_when_the_command_returns(form, tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    result = cli_mount(mounts, mnt, *form, "-o", f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work}", mnt)
    assert_mounted_ok(result, mnt)
    assert_merged(mnt)
    (mnt / "new").write_text("new\n")
    assert (tree.upper / "new").read_text() == "new\n"


def test_options_given_twice_are_combined(tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    result = cli_mount(mounts, mnt, "-o", tree.lowerdir, "-o", f"upperdir={tree.upper},workdir={tree.work}", mnt)
    assert_mounted_ok(result, mnt)
    assert_merged(mnt)
    (mnt / "new").write_text("x")  # writable: the second -o's upperdir was taken
    assert (tree.upper / "new").exists()


def test_relative_paths_from_the_current_directory_like_containers_storage(mounts, tmp_path):
    # containers-storage's layout: <graphroot>/overlay/<id>/diff, short links in l/, cwd = overlay/.
    home = tmp_path / "graphroot" / "overlay"
    for layer, name in (("base", "DEF"), ("app", "ABC")):
        (home / layer / "diff").mkdir(parents=True)
        (home / layer / "diff" / layer).write_text(layer)
        (home / "l").mkdir(exist_ok=True)
        (home / "l" / name).symlink_to(f"../{layer}/diff")
    (home / "base" / "diff" / "shared").write_text("base")
    (home / "app" / "diff" / "shared").write_text("app")
    (home / "ctr" / "diff").mkdir(parents=True)
    (home / "ctr" / "work").mkdir()
    mnt = home / "ctr" / "merged"
    result = cli_mount(mounts, mnt, "-o", "lowerdir=l/ABC:l/DEF,upperdir=ctr/diff,workdir=ctr/work", mnt, cwd=home)
    assert_mounted_ok(result, mnt)
    assert sorted(os.listdir(mnt)) == ["app", "base", "shared"]
    assert (mnt / "shared").read_text() == "app"
    (mnt / "new").write_text("x")
    assert (home / "ctr" / "diff" / "new").exists()


def test_backslash_escapes_colon_and_comma_in_paths(layers, mounts, tmp_path):
    top, bottom = layers.dir("top:1"), layers.dir("bottom,2")
    upper, work = layers.dir("up,per"), layers.dir("wo:rk")
    (top / "t").write_text("t")
    (bottom / "b").write_text("b")
    mnt = tmp_path / "mnt"
    esc = lambda p: str(p).replace(":", "\\:").replace(",", "\\,")  # noqa: E731
    result = cli_mount(
        mounts, mnt, "-o", f"lowerdir={esc(top)}:{esc(bottom)},upperdir={esc(upper)},workdir={esc(work)}", mnt
    )
    assert_mounted_ok(result, mnt)
    assert sorted(os.listdir(mnt)) == ["b", "t"]
    (mnt / "new").write_text("x")
    assert (upper / "new").exists()


# -- foreground, debug ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, logs",
    [(["-f", "--debug"], True), (["--debug"], True), (["-f"], False)],
    ids=["foreground-debug", "daemon-debug", "foreground-quiet"],
)
def test_foreground_and_debug(flags, logs, tree, mounts, tmp_path):
    mnt, log = tmp_path / "mnt", tmp_path / "stderr.log"
    mnt.mkdir()
    mounts.points.append(mnt)
    foreground = "-f" in flags
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [LAYERFS, "mount", *flags, "-o", tree.lowerdir, str(mnt)], stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        if foreground:
            assert wait_for(lambda: is_mounted(mnt) or proc.poll() is not None), "never mounted"
            assert proc.poll() is None, log.read_text()  # still running: it is the filesystem
            assert daemon_pids(mnt) == [proc.pid]  # and it did not fork
        else:
            assert proc.wait(timeout=60) == 0 and is_mounted(mnt)
        assert (mnt / "from-top").read_text() == "t\n"
        assert layerfs_cmd("umount", mnt).returncode == 0
        if foreground:
            assert proc.wait(timeout=60) == 0
        assert_daemon_exits(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    if logs:
        assert "from-top" in text  # the lookup, open and read of the file we touched
    else:
        assert text == ""


def _stop_foreground(sig: int, lowerdir: str, mnt: Path, *, at_once: bool = False) -> None:
    """Start ``layerfs -f``, send ``sig`` once the mount is there (``at_once``: looked for without a pause,
    so that the signal lands before the kernel's INIT reaches the daemon); it must exit 0, nothing mounted."""
    proc = subprocess.Popen([LAYERFS, "-f", "-o", lowerdir, str(mnt)], stderr=subprocess.PIPE, text=True)
    try:
        if at_once:
            while not is_mounted(mnt) and proc.poll() is None:
                pass
        else:
            wait_for(lambda: is_mounted(mnt) or proc.poll() is not None)
        assert proc.poll() is None and is_mounted(mnt)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_foreground_signal_unmounts_and_exits(sig, tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.points.append(mnt)
    _stop_foreground(sig, tree.lowerdir, mnt)


def test_a_signal_before_the_kernel_initialised_the_mount_still_ends_cleanly(tree, mounts, tmp_path):
    """SIGTERM the moment the mount appears, before the kernel's INIT reached the daemon (it did, every
    time, before the daemon took such an unmount for its own stop): exit 0, nothing mounted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.points.append(mnt)
    for _ in range(10):
        _stop_foreground(signal.SIGTERM, tree.lowerdir, mnt, at_once=True)


# -- errors: one line, exit code != 0, nothing mounted ----------------------------------------------

ERROR_CASES = {
    "no-lowerdir": lambda t: [f"upperdir={t.upper},workdir={t.work}"],
    "lowerdir-missing": lambda t: [f"lowerdir={t.top}:{t.top.parent / 'nope'}"],
    "lowerdir-is-a-file": lambda t: [f"lowerdir={t.top / 'shared'}"],
    "lowerdir-empty-entry": lambda t: [f"lowerdir={t.top}::{t.bottom}"],
    "upperdir-missing": lambda t: [f"{t.lowerdir},upperdir={t.top.parent / 'nope'},workdir={t.work}"],
    "upperdir-without-workdir": lambda t: [f"{t.lowerdir},upperdir={t.upper}"],
    "workdir-missing": lambda t: [f"{t.lowerdir},upperdir={t.upper},workdir={t.top.parent / 'nope'}"],
    "upperdir-inside-workdir": lambda t: [f"{t.lowerdir},upperdir={t.work / 'up'},workdir={t.work}"],
    "workdir-inside-upperdir": lambda t: [f"{t.lowerdir},upperdir={t.upper},workdir={t.upper / 'wk'}"],
    "workdir-is-upperdir": lambda t: [f"{t.lowerdir},upperdir={t.upper},workdir={t.upper}"],
}


def assert_mount_refused(result: subprocess.CompletedProcess, mnt: Path) -> str:
    line = assert_one_line_error(result)
    assert not is_mounted(mnt)
    assert not daemon_pids(mnt)
    return line


@pytest.mark.parametrize("case", ERROR_CASES)
def test_unusable_options_are_a_one_line_error(case, tree, mounts, tmp_path):
    (tree.work / "up").mkdir()
    (tree.upper / "wk").mkdir()
    mnt = tmp_path / "mnt"
    options = ",".join(ERROR_CASES[case](tree))
    assert_mount_refused(cli_mount(mounts, mnt, "-o", options, mnt), mnt)


def test_workdir_on_another_filesystem_is_refused(tree, tmpfs, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    result = cli_mount(mounts, mnt, "-o", f"{tree.lowerdir},upperdir={tree.upper},workdir={tmpfs}", mnt)
    assert "workdir" in assert_mount_refused(result, mnt)
    assert os.listdir(tmpfs) == []


@pytest.mark.parametrize("where", ["missing", "a-file"])
def test_unusable_mount_point_is_refused(where, tree, tmp_path):
    mnt = tmp_path / "mnt"
    if where == "a-file":
        mnt.write_text("")
    result = layerfs_cmd("-o", tree.lowerdir, mnt)
    assert str(mnt.name) in assert_one_line_error(result)
    assert not is_mounted(mnt) and not daemon_pids(mnt)


def test_no_mount_point_given(tree):
    assert_one_line_error(layerfs_cmd("mount", "-o", tree.lowerdir))


# -- options that change nothing or little ---------------------------------------------------------


def test_unknown_options_are_a_warning_and_the_mount_proceeds(tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    result = cli_mount(
        mounts, mnt, "-o", f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work},frobnicate,colour=blue", mnt
    )
    assert_mounted_ok(result, mnt)
    warnings = result.stderr.splitlines()
    assert all(w.startswith("layerfs: ") for w in warnings)
    assert any("frobnicate" in w for w in warnings) and any("colour" in w for w in warnings)
    (mnt / "new").write_text("x")
    assert (tree.upper / "new").exists()


def test_volatile_is_accepted_silently(tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    result = cli_mount(mounts, mnt, "-o", f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work},volatile", mnt)
    assert_mounted_ok(result, mnt)
    assert result.stderr == ""
    (mnt / "new").write_text("kept")
    mounts.unmount(mnt)
    assert (tree.upper / "new").read_text() == "kept"


def every_write_fails_with_erofs(mnt: Path) -> None:
    writes = {
        "create": lambda: (mnt / "new").write_text("x"),
        "open-for-write": lambda: os.close(os.open(mnt / "shared", os.O_WRONLY)),
        "mkdir": lambda: os.mkdir(mnt / "dir"),
        "unlink": lambda: os.unlink(mnt / "from-bottom"),
        "rename": lambda: os.rename(mnt / "from-top", mnt / "renamed"),
        "chmod": lambda: os.chmod(mnt / "shared", 0o600),
        "symlink": lambda: os.symlink("shared", mnt / "link"),
        "setxattr": lambda: os.setxattr(mnt / "shared", "user.x", b"1"),
    }
    assert {name: errno_of(w) for name, w in writes.items()} == {name: errno.EROFS for name in writes}
    assert_merged(mnt)


def test_without_upperdir_the_mount_is_read_only(tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    assert_mounted_ok(cli_mount(mounts, mnt, "-o", tree.lowerdir, mnt), mnt)
    every_write_fails_with_erofs(mnt)


def test_ro_option_makes_the_mount_read_only(tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    result = cli_mount(mounts, mnt, "-o", f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work},ro", mnt)
    assert_mounted_ok(result, mnt)
    every_write_fails_with_erofs(mnt)
    assert os.listdir(tree.upper) == []


# -- unmounting and the daemon's end ----------------------------------------------------------------


def stop_by_signal(mnt: Path) -> None:
    for pid in daemon_pids(mnt):
        os.kill(pid, signal.SIGTERM)
    assert wait_for(lambda: not is_mounted(mnt))


# How a mount ends: our command, and what containers-storage and people use (as fuse-overlayfs allows).
STOPS = {
    "layerfs-umount": lambda mnt: layerfs_cmd("umount", mnt).check_returncode(),
    "umount": lambda mnt: subprocess.run(["umount", str(mnt)], check=True),
    "fusermount3-u": lambda mnt: subprocess.run(["fusermount3", "-u", str(mnt)], check=True),
    "sigterm-to-daemon": stop_by_signal,
}


@pytest.mark.parametrize("stop", STOPS)
def test_unmounting_ends_the_daemon(stop, tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    assert_mounted_ok(cli_mount(mounts, mnt, "-o", tree.lowerdir, mnt), mnt)
    assert daemon_pids(mnt)
    STOPS[stop](mnt)
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == []  # the bare directory again
    assert_daemon_exits(mnt)


def test_the_exit_command_runs_when_the_owners_end_has_unmounted(tree, mounts, tmp_path):
    """x-layerfs-exit-command (conmon's --exit-command): run by the daemon once its owner has ended and it
    has unmounted, not when the mount is unmounted otherwise."""
    mnt, said = tmp_path / "mnt", tmp_path / "said"
    owner = subprocess.Popen(["sleep", "100"])
    script = 'grep -c " $0 " /proc/mounts > "$1"'  # (how often the mount point is mounted, as it runs)
    options = f"{tree.lowerdir},x-layerfs-owner={owner.pid},x-layerfs-exit-command=/bin/sh:-c:{script}:{mnt}:{said}"
    try:
        assert_mounted_ok(cli_mount(mounts, mnt, "-o", options, mnt), mnt)
        layerfs_cmd("umount", mnt).check_returncode()  # unmounted while the owner lives: no exit command
        assert_daemon_exits(mnt)
        assert_mounted_ok(cli_mount(mounts, mnt, "-o", options, mnt), mnt)
        assert not said.exists()
    finally:
        owner.kill()
        owner.wait()
    assert wait_for(lambda: said.exists() and said.read_text() == "0\n")
    assert not is_mounted(mnt)
    refused = layerfs_cmd("mount", "-o", f"{tree.lowerdir},x-layerfs-exit-command=/bin/true", mnt)
    assert assert_one_line_error(refused) == (
        "layerfs: x-layerfs-exit-command needs an x-layerfs-owner (it runs when the owner has gone)"
    )


def _listing(top: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(top)): (p.stat().st_size, p.stat().st_mtime_ns) for p in top.rglob("*")}


@pytest.mark.parametrize("stop", STOPS)
def test_the_daemon_writes_nothing_in_the_work_directory_once_unmounted(stop, tree, mounts, tmp_path):
    """Podman unmounts a build step's container and removes its layer's directories at once, while the
    daemon may still be exiting: a file the daemon made then fails the removal (ENOTEMPTY)."""
    mnt = tmp_path / "mnt"
    upper = f"upperdir={tree.upper},workdir={tree.work}"
    assert_mounted_ok(cli_mount(mounts, mnt, "-o", f"{tree.lowerdir},{upper}", mnt), mnt)
    (mnt / "new").write_text("x")
    (mnt / "shared").unlink()
    before = _listing(tree.work)
    assert any("journal-" in name for name in before)  # (what should stay as it is)
    STOPS[stop](mnt)
    assert_daemon_exits(mnt)
    assert _listing(tree.work) == before
    result = layerfs_cmd("diff", "--upperdir", tree.upper, "--workdir", tree.work, "--lowerdir", tree.lowerdir[9:])
    assert result.returncode == 0 and sorted(result.stdout.splitlines()) == ["A /new", "D /shared"], result


@pytest.mark.parametrize("what", ["not-mounted", "missing"])
def test_umount_of_something_not_mounted_is_a_clear_error(what, tmp_path):
    path = tmp_path / "dir"
    if what == "not-mounted":
        path.mkdir()
    assert str(path) in assert_one_line_error(layerfs_cmd("umount", path))


def test_umount_with_a_file_open_says_busy_then_lazy_umount_ends_the_daemon_on_close(tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    assert_mounted_ok(cli_mount(mounts, mnt, "-o", tree.lowerdir, mnt), mnt)
    with open(mnt / "shared") as f:
        assert_one_line_error(layerfs_cmd("umount", mnt))
        assert is_mounted(mnt) and f.read() == "top\n"
        assert layerfs_cmd("umount", "-l", mnt).returncode == 0
        assert not is_mounted(mnt)
        assert daemon_pids(mnt)  # still serving the open file
        f.seek(0)
        assert f.read() == "top\n"
    assert_daemon_exits(mnt)


def test_killed_daemon_leaves_enotconn_and_umount_cleans_it_up(tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    assert_mounted_ok(cli_mount(mounts, mnt, "-o", tree.lowerdir, mnt), mnt)
    (pid,) = daemon_pids(mnt)
    os.kill(pid, signal.SIGKILL)
    # (A stat could still be answered from the kernel's attribute cache; a listing has to ask.)
    assert wait_for(lambda: errno_of(lambda: os.listdir(mnt)) == errno.ENOTCONN)
    result = layerfs_cmd("umount", mnt)
    assert result.returncode == 0, result.stderr
    assert not is_mounted(mnt)
    assert os.listdir(mnt) == []


def test_leftovers_in_the_work_directory_are_removed_at_mount(tree, mounts, tmp_path):
    # What a crash mid copy-up or mid rename leaves: half files and directories, unreadable ones too.
    leftovers = tree.work / "work"
    (leftovers / "#1f" / "deep").mkdir(parents=True)
    (leftovers / "#1f" / "deep" / "half-copied").write_text("partial")
    (leftovers / "#20").write_text("partial")
    (leftovers / "#1f").chmod(0o000)
    mnt = tmp_path / "mnt"
    result = cli_mount(mounts, mnt, "-o", f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work}", mnt)
    assert_mounted_ok(result, mnt)
    assert os.listdir(leftovers) == []
    assert_merged(mnt)  # and none of it shows
    (mnt / "shared").write_text("copied up")  # copy-up still goes through the work directory
    assert (tree.upper / "shared").read_text() == "copied up"


def test_files_closed_through_the_mount_are_closed_by_the_daemon(tree, mounts, tmp_path):
    mnt = tmp_path / "mnt"
    assert_mounted_ok(
        cli_mount(mounts, mnt, "-o", f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work}", mnt), mnt
    )
    (pid,) = daemon_pids(mnt)
    layers = tree.top.parent
    # The daemon holds its layer roots, work directory and change index open for as long as it runs (so
    # that a layer hidden by the mount point stays reachable); nothing else of the layers may stay open.
    roots = sorted(open_files_under(pid, layers))
    index = tree.work / "layerfs-index"
    held = (tree.top, tree.bottom, tree.upper, tree.work / "work", index, *index.glob("journal-*"))
    assert roots == sorted(str(p) for p in held), roots
    with open(mnt / "from-bottom", "a") as held:  # copy-up, and an fd the daemon must keep
        held.write("more\n")
        held.flush()
        assert str(tree.upper / "from-bottom") in open_files_under(pid, layers)
    for i in range(20):
        (mnt / "shared").read_text()
        (mnt / f"new-{i}").write_text("x")
        with open(mnt / "from-top", "a") as f:
            f.write("y")
    # close() does not wait for FUSE's release, so the daemon may take a moment to close its side.
    assert wait_for(lambda: sorted(open_files_under(pid, layers)) == roots), open_files_under(pid, layers)


def test_unmount_releases_every_file_of_the_layers(tmpfs, mounts, tmp_path):
    # Everything on one tmpfs: once layerfs is unmounted and its daemon gone, nothing may hold it busy.
    lower, upper, work = (tmpfs / n for n in ("lower", "upper", "work"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "read-me").write_text("data")
    (lower / "dir").mkdir()
    mnt = tmp_path / "mnt"
    assert_mounted_ok(cli_mount(mounts, mnt, "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", mnt), mnt)
    readers = [open(mnt / "read-me") for _ in range(3)]
    writer = open(mnt / "dir" / "new", "w")
    writer.write("x")
    assert [r.read() for r in readers] == ["data"] * 3
    for f in readers + [writer]:
        f.close()
    assert layerfs_cmd("umount", mnt).returncode == 0
    assert_daemon_exits(mnt)
    assert pids_using(tmpfs) == []
    subprocess.run(["umount", str(tmpfs)], check=True, capture_output=True)


def test_mount_over_one_of_its_own_lower_dirs_shows_what_was_there_like_overlayfs(layers, mounts, tmp_path):
    # "Overlay a directory onto itself" (make /usr writable by mounting over /usr): the layers are the
    # directories as they were before the mount, not the mount itself.
    seen = {}
    for fs in ("overlay", "layerfs"):
        target, extra = layers.dir(f"{fs}-target"), layers.dir(f"{fs}-extra")
        (target / "was-there").write_text("old\n")
        (extra / "extra").write_text("e\n")
        lowers, upper, work = [target, extra], layers.dir(f"{fs}-upper"), layers.dir(f"{fs}-work")
        if fs == "overlay":
            mounts.overlay(target, lowers, upper, work)
        else:
            result = cli_mount(
                mounts, target, "-o", f"lowerdir={target}:{extra},upperdir={upper},workdir={work}", target
            )
            assert result.returncode == 0 and is_mounted(target), result.stderr
        # In a subprocess with a timeout: a daemon that looks its layers up through its own mount hangs.
        listing = subprocess.run(["ls", "-A", str(target)], capture_output=True, text=True, timeout=30)
        content = subprocess.run(["cat", str(target / "was-there")], capture_output=True, text=True, timeout=30)
        seen[fs] = (listing.stdout.split(), listing.returncode, content.stdout, content.returncode)
    assert seen["overlay"] == (["extra", "was-there"], 0, "old\n", 0)
    assert seen["layerfs"] == seen["overlay"]


# -- what the command line refuses -------------------------------------------------------------------


@pytest.fixture
def store_with_container(tmp_path) -> Path:
    """A store with a container named ``top`` (docker's command, not layerfs's), of a one-file image."""
    rootfs, root = tmp_path / "rootfs", tmp_path / "store"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc/hello").write_text("hi\n")
    subprocess.run(["tar", "-C", rootfs, "-cf", tmp_path / "rootfs.tar", "."], check=True)
    for args in (["import", f"rootfs:{tmp_path / 'rootfs.tar'}", "demo"], ["create", "--name", "top", "demo"]):
        assert layerfs_cmd(*args, "--root", root).returncode == 0
    return root


@pytest.mark.parametrize(
    "argv, line",
    [
        (["imgaes"], "layerfs: imgaes: unknown command (did you mean images?)"),
        (["frobnicate", "x"], "layerfs: frobnicate: unknown command (layerfs --help lists them)"),
        # mount.fuse3's form is taken with the source fuse3.layerfs mounts name, layerfs, only
        (["overlay", "/x", "-o", "lowerdir=/a"], "layerfs: overlay: unknown command (layerfs --help lists them)"),
    ],
)
def test_an_unknown_command_is_refused_with_the_nearest_one(argv, line):
    result = layerfs_cmd(*argv)
    assert result.returncode == 2
    assert assert_one_line_error(result) == line


@pytest.mark.parametrize("flags", [[], ["-f"]], ids=["plain", "foreground"])
def test_a_container_name_is_never_taken_for_a_command(flags, store_with_container, mounts, tmp_path):
    # Before: `layerfs logs DIR` mounted container logs over DIR, without a word (logs is a command now).
    mnt = tmp_path / "full"
    mnt.mkdir()
    (mnt / "mine").write_text("x")
    mounts.points.append(mnt)
    result = layerfs_cmd(*flags, "top", mnt, env={**os.environ, "LAYERFS_ROOT": str(store_with_container)})
    assert "top: unknown command" in assert_one_line_error(result)
    assert result.returncode == 2
    assert not is_mounted(mnt) and os.listdir(mnt) == ["mine"]


def test_the_mount_form_with_two_mount_points_is_refused(tree, mounts, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    two.mkdir()
    result = cli_mount(mounts, one, "-o", f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work}", one, two)
    assert_mount_refused(result, one)
    assert not is_mounted(two)


def test_a_container_is_not_mounted_over_a_non_empty_directory(store_with_container, mounts, tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    (mnt / "mine").write_text("x")
    result = cli_mount(mounts, mnt, "mount", "--root", store_with_container, "top", mnt)
    assert assert_mount_refused(result, mnt) == f"layerfs: {mnt}: mount point is not empty"
    assert os.listdir(mnt) == ["mine"]
    empty = tmp_path / "empty"
    assert_mounted_ok(cli_mount(mounts, empty, "mount", "--root", store_with_container, "top", empty), empty)
    assert (empty / "etc/hello").read_text() == "hi\n"


def test_the_fuse_overlayfs_form_mounts_over_a_non_empty_directory_as_its_peers_do(tree, mounts, tmp_path):
    # Kernel overlayfs and fuse-overlayfs (libfuse 3 dropped `nonempty`) both do, and containers-storage
    # may hand its mount program a merged directory with something in it.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "hidden").write_text("x")
    for fs in ("overlay", "layerfs"):
        options = f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work}"
        if fs == "overlay":
            mounts.points.append(mnt)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, mnt], check=True)
        else:
            assert_mounted_ok(cli_mount(mounts, mnt, "-o", options, mnt), mnt)
        assert_merged(mnt)
        layerfs_cmd("umount", mnt) if fs == "layerfs" else subprocess.run(["umount", mnt], check=True)
    assert os.listdir(mnt) == ["hidden"]


@pytest.mark.parametrize("role", ["upperdir", "workdir"])
def test_an_upper_or_work_directory_in_use_by_a_mount_is_refused(role, tree, layers, mounts, tmp_path):
    # As kernel overlayfs refuses them (EBUSY): two daemons would each change the directory under the other.
    first, second = tmp_path / "first", tmp_path / "second"
    options = f"{tree.lowerdir},upperdir={tree.upper},workdir={tree.work}"
    assert_mounted_ok(cli_mount(mounts, first, "-o", options, first), first)
    dirs = {"upperdir": layers.dir("upper2"), "workdir": layers.dir("work2"), role: getattr(tree, role[:-3])}
    options = f"{tree.lowerdir},upperdir={dirs['upperdir']},workdir={dirs['workdir']}"
    line = assert_mount_refused(cli_mount(mounts, second, "-o", options, second), second)
    assert line == f"layerfs: {role} {dirs[role]}: in use by the mount at {first}"
    assert layerfs_cmd("umount", first).returncode == 0
    assert_mounted_ok(cli_mount(mounts, second, "-o", options, second), second)  # free again


@pytest.mark.parametrize("argv", [["--help"], ["diff", "--upperdir", "{upper}", "--lowerdir", "{lower}"]])
def test_a_closed_standard_output_ends_the_command_quietly(argv, tmp_path):
    # As `layerfs diff ... | head -1` once the head has gone: the status of a command SIGPIPE ended.
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    lower.mkdir()
    for i in range(5000):  # more than a pipe holds, for the diff
        (upper / f"file{i}").touch()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = layerfs_cmd(
            *(a.format(upper=upper, lower=lower) for a in argv),
            capture_output=False,
            stdout=write_end,
            stderr=subprocess.PIPE,
        )
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode in (0, 128 + signal.SIGPIPE)
    if argv[0] == "diff":
        assert result.returncode == 128 + signal.SIGPIPE

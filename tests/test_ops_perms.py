"""Permissions and ownership on real mounts, compared with kernel overlayfs: chmod, chown, utimens
(UTIME_NOW and UTIME_OMIT too), and what an ordinary user (uid 1000) may and may not do there: new
files owned by the caller, EACCES/EPERM as the kernel decides, setgid directories, setuid programs and
device files in a mount made by root."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from pair import (
    USER,
    Err,
    Stack,
    append,
    as_user,
    describe,
    errname,
    make_pair,
    outcome,
    tree,
    whiteout,
    write,
)

GROUP = 3000  # the user's primary group in these tests: not its own uid, so a mix-up shows
OTHER_GROUP = 2000  # a group the user is not in


def build(s: Stack) -> None:
    top, mid, bottom = s.lowers
    write(bottom / "secret", "root only", mode=0o600)
    write(bottom / "pub", "everyone reads")
    write(bottom / "rootdir/f", "in a root dir")
    home = bottom / "home"
    write(home / "mine", "the user's")
    for p in (home, home / "mine"):
        os.chown(p, USER, GROUP)
    shared = bottom / "shared"
    write(shared / "others", "root's, writable by all", mode=0o666)
    shared.chmod(0o1777)
    sgid = bottom / "sgid"
    sgid.mkdir()
    os.chown(sgid, 0, OTHER_GROUP)
    sgid.chmod(0o2777)
    write(mid / "mid-file", "in mid")
    # The same directory in two layers with different modes: the upper-most one decides.
    write(bottom / "open-below/x", "x")
    (bottom / "open-below").chmod(0o777)
    (top / "open-below").mkdir()
    write(bottom / "open-above/x", "x")
    (top / "open-above").mkdir()
    (top / "open-above").chmod(0o777)
    setuid = write(home / "own-setuid", "#!/bin/sh\n")
    os.chown(setuid, USER, GROUP)
    setuid.chmod(0o6755)
    write(home / "others-setuid", "#!/bin/sh\n", mode=0o6777)  # root's, writable by all
    write(bottom / "gone", "deleted in mid")
    whiteout(mid, "gone")
    os.mknod(top / "null", stat.S_IFCHR, os.makedev(1, 3))
    (top / "null").chmod(0o666)
    whoami = top / "bin/whoami-suid"
    whoami.parent.mkdir()
    shutil.copy2(shutil.which("whoami"), whoami)
    whoami.chmod(0o4755)


def test_chmod_and_chown_as_root(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)

    def scenario(mnt: Path):
        steps = {
            "file": outcome(os.chmod, mnt / "pub", 0o640),
            "setuid": outcome(os.chmod, mnt / "mid-file", 0o4755),
            "setgid": outcome(os.chmod, mnt / "secret", 0o2750),
            "dir": outcome(os.chmod, mnt / "rootdir", 0o1777),
            "missing": outcome(os.chmod, mnt / "gone", 0o644),
            "chown": outcome(os.chown, mnt / "pub", USER, GROUP),
            "chown gid only": outcome(os.chown, mnt / "rootdir/f", -1, OTHER_GROUP),
            # Root too loses setuid and setgid bits on chown of a regular file.
            "chown setuid": outcome(os.chown, mnt / "mid-file", USER, -1),
            "chown setgid": outcome(os.chown, mnt / "secret", -1, GROUP),
            "chown dir": outcome(os.chown, mnt / "home", 0, 0),
            "chown device": outcome(os.chown, mnt / "null", USER, USER),
            "chown missing": outcome(os.chown, mnt / "gone", 0, 0),
        }
        return {"steps": steps, "tree": tree(mnt, data=False)}

    seen = pair.compare(scenario)
    files = seen["tree"]
    assert files["pub"]["mode"] == "0640" and (files["pub"]["uid"], files["pub"]["gid"]) == (USER, GROUP)
    assert files["mid-file"]["mode"] == "0755" and files["rootdir"]["mode"] == "1777"
    assert files["rootdir/f"]["gid"] == OTHER_GROUP and seen["steps"]["missing"] == Err("ENOENT")
    pair.compare_uppers()


def test_utimens(mounts, tmp_path):
    pair = make_pair(mounts, tmp_path, build)
    A, M = 1_000_000_000_123_456_789, 1_100_000_000_987_654_321  # 2001 and 2004, to the nanosecond

    def times(p: Path) -> tuple[int, int]:
        st = os.lstat(p)
        return st.st_atime_ns, st.st_mtime_ns

    def scenario(mnt: Path):
        f = mnt / "pub"
        steps = {}
        os.utime(f, ns=(A, M))
        steps["explicit"] = times(f)
        subprocess.run(["touch", "-a", str(f)], check=True)  # atime now, mtime UTIME_OMIT
        a, m = times(f)
        steps["touch -a"] = (a > A, m == M)
        subprocess.run(["touch", "-m", "-d", "@1200000000", str(f)], check=True)  # atime UTIME_OMIT
        steps["touch -m"] = (times(f)[0] == a, times(f)[1])
        os.utime(f)  # both UTIME_NOW
        a, m = times(f)
        steps["now"] = (a == m, m > 1_200_000_000 * 10**9)
        os.utime(mnt / "home", ns=(A, M))
        steps["lower dir"] = times(mnt / "home")
        os.utime(mnt / "bin/whoami-suid", ns=(A, M), follow_symlinks=False)
        os.symlink("pub", mnt / "link")
        os.utime(mnt / "link", ns=(M, A), follow_symlinks=False)
        steps["symlink itself"] = times(mnt / "link")
        steps["target kept"] = times(f) == (a, m)
        steps["missing"] = outcome(os.utime, mnt / "gone", ns=(A, M))
        return steps

    seen = pair.compare(scenario)
    assert seen["explicit"] == (A, M) and seen["touch -a"] == (True, True)
    assert seen["touch -m"] == (True, 1_200_000_000 * 10**9) and seen["now"] == (True, True)
    assert seen["symlink itself"] == (M, A) and seen["target kept"]


def _write_device(path: Path) -> int:
    with open(path, "r+b", buffering=0) as f:
        return f.write(b"x")


def _user_steps(mnt: Path) -> dict:
    """An ordinary user at work; run as USER:GROUP with no supplementary groups."""
    os.umask(0o022)
    home, sgid = mnt / "home", mnt / "sgid"
    steps = {
        "read secret": outcome(lambda: (mnt / "secret").read_bytes()),
        "read pub": outcome(lambda: (mnt / "pub").read_bytes()),
        "write pub": outcome(os.open, mnt / "pub", os.O_WRONLY),
        "truncate pub": outcome(os.truncate, mnt / "pub", 0),
        "create in root dir": outcome(os.open, mnt / "rootdir/new", os.O_WRONLY | os.O_CREAT, 0o644),
        "mkdir in root dir": outcome(os.mkdir, mnt / "rootdir/new"),
        "unlink in root dir": outcome(os.unlink, mnt / "rootdir/f"),
        "rename in root dir": outcome(os.rename, mnt / "rootdir/f", mnt / "home/f"),
        "rmdir root dir": outcome(os.rmdir, mnt / "bin"),
        "chmod others' file": outcome(os.chmod, mnt / "pub", 0o666),
        "chown own file away": outcome(os.chown, home / "mine", 0, -1),
        "chgrp to foreign group": outcome(os.chown, home / "mine", -1, OTHER_GROUP),
        "chown own file to self": outcome(os.chown, home / "mine", USER, GROUP),
        "chmod own lower file": outcome(os.chmod, home / "mine", 0o600),
        "write own lower file": outcome(lambda: (home / "mine").write_text("changed")),
        "utime now, no write access": outcome(os.utime, mnt / "pub"),
        "utime explicit, not owner": outcome(os.utime, mnt / "pub", (1, 1)),
        "utime now, writable": outcome(os.utime, mnt / "shared/others"),
        "xattr on others' file": outcome(os.setxattr, mnt / "pub", "user.x", b"x"),
        "xattr on own file": outcome(os.setxattr, home / "mine", "user.x", b"x"),
        "trusted xattr": outcome(os.setxattr, home / "mine", "trusted.x", b"x"),
        "hard link to others' file": outcome(os.link, mnt / "secret", home / "stolen"),
        "sticky: unlink others'": outcome(os.unlink, mnt / "shared/others"),
        "sticky: rename others'": outcome(os.rename, mnt / "shared/others", mnt / "shared/x"),
        "mknod device": outcome(os.mknod, home / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        "create where a lower layer allows it": outcome(write, mnt / "open-below/new", "n"),
        "create where the top layer allows it": errname(write, mnt / "open-above/new", "n"),
        # Writing to one's own setuid/setgid file drops both bits (the kernel's file_remove_privs).
        "write own setuid file": errname(append, home / "own-setuid", b"#"),
        "write others' setuid file": errname(append, home / "others-setuid", b"#"),
        "access": {
            rel: "".join(k for k, m in (("R", os.R_OK), ("W", os.W_OK), ("X", os.X_OK)) if os.access(mnt / rel, m))
            for rel in ("secret", "pub", "home", "rootdir", "shared", "bin/whoami-suid")
        },
    }
    # What the user makes belongs to the user, with the caller's group.
    write(home / "new", "new")
    os.mkdir(home / "newdir")
    os.symlink("new", home / "newlink")
    os.mkfifo(home / "fifo")
    write(mnt / "shared/mine", "mine")
    steps["sticky: unlink own"] = outcome(os.unlink, mnt / "shared/mine")
    # A setgid directory hands down its group, and to directories its setgid bit.
    write(sgid / "file", "f")
    os.mkdir(sgid / "sub")
    write(sgid / "sub/deeper", "d")
    # chmod g+s on a file of a group the user is not in: the kernel drops the bit silently.
    steps["chmod g+s, foreign group"] = outcome(os.chmod, sgid / "file", 0o2755)
    steps["device"] = outcome(_write_device, mnt / "null")
    run = subprocess.run([str(mnt / "bin/whoami-suid")], capture_output=True, text=True)
    steps["setuid program"] = (run.returncode, run.stdout.strip())
    return {"steps": steps, "home": tree(home), "sgid": tree(sgid)}


def test_ordinary_user(mounts, tmp_path, public_base):
    pair = make_pair(mounts, tmp_path, build, mnt_base=public_base)
    seen = pair.compare(as_user(_user_steps, USER, GROUP))
    steps, home, sgid = seen["steps"], seen["home"], seen["sgid"]
    # The facts that matter, whatever the kernel says.
    assert steps["read secret"] == Err("EACCES") and steps["read pub"] == b"everyone reads"
    assert steps["create in root dir"] == Err("EACCES") and steps["chmod others' file"] == Err("EPERM")
    assert steps["utime explicit, not owner"] == Err("EPERM") and steps["sticky: unlink others'"] == Err("EPERM")
    for rel in ("new", "newdir", "newlink", "fifo"):
        assert (home[rel]["uid"], home[rel]["gid"]) == (USER, GROUP), rel
    assert sgid["file"]["gid"] == OTHER_GROUP and sgid["file"]["mode"] == "0755"
    assert sgid["sub"]["gid"] == OTHER_GROUP and sgid["sub"]["mode"] == "2755"
    assert sgid["sub/deeper"]["gid"] == OTHER_GROUP
    assert steps["setuid program"] == (0, "root") and steps["device"] == 1
    assert steps["create where a lower layer allows it"] == Err("EACCES")
    assert steps["create where the top layer allows it"] == "ok" and home["own-setuid"]["mode"] == "0755"
    assert steps["write others' setuid file"] == "ok" and home["others-setuid"]["mode"] == "0777"
    pair.compare_uppers()


def test_root_changes_seen_by_user_at_once(mounts, tmp_path, public_base):
    """Root changes a file's mode and owner; right after, the user gets the new answer (attributes are
    cached by the kernel for 1 s, so layerfs must hand back fresh ones on every change)."""
    pair = make_pair(mounts, tmp_path, build, mnt_base=public_base)

    def read(mnt: Path):
        return outcome(lambda: (mnt / "pub").read_bytes()), outcome(lambda: (mnt / "home/mine").read_bytes())

    def scenario(mnt: Path):
        seen = {"before": as_user(read)(mnt)}
        os.chmod(mnt / "pub", 0o600)
        os.chown(mnt / "home/mine", 0, 0)
        os.chmod(mnt / "home/mine", 0o600)
        seen["after"] = as_user(read)(mnt)
        seen["pub"] = describe(mnt / "pub", data=False)
        return seen

    seen = pair.compare(scenario)
    assert seen["before"] == (b"everyone reads", b"the user's") and seen["after"] == (Err("EACCES"),) * 2

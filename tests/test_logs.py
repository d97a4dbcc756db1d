"""``layerfs logs`` of a detached container as docker users expect it: each stream kept apart, with its
times, shown as ``podman logs`` shows the same container's output (its ``k8s-file`` log: ordering
within a stream, a partial last line, empty output, binary bytes, a ``-t`` container's one stream, fast
output ended at once), and docker's ``-t``, ``--tail``, ``--since``, ``--until`` and ``-f``."""

from __future__ import annotations

import calendar
import re
import subprocess
import time

import pytest
from conftest import LAYERFS, layerfs
from test_run_volumes import box  # noqa: F401 (the fixture: a busybox image in layerfs's store and Podman's)

pytestmark = pytest.mark.root  # containers: namespaces, mounts
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}\+00:00"


def _counting(to: int) -> str:
    """A script writing 0 to ``to``, a line a write, as fast as it can."""
    return f"i=0; while [ $i -le {to} ]; do echo $i; i=$((i+1)); done"


def _ran(images, name: str, script: str, *flags: str) -> None:
    """``sh -c SCRIPT`` run detached to its end under layerfs and Podman, as ``name``."""
    _, image, podman = images
    podman("run", "-d", *flags, "--name", name, image, "sh", "-c", script)
    _ran_here(images, name, script, *flags)
    podman("wait", name)


def _ran_here(images, name: str, script: str, *flags: str) -> None:
    """``sh -c SCRIPT`` run detached to its end under layerfs, as ``name``."""
    store = images[0]
    layerfs("run", "--root", store, "-d", *flags, "--name", name, "box:1", "sh", "-c", script)
    layerfs("wait", "--root", store, name)


def _logs(images, name: str, *flags: str) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    """``logs FLAGS NAME``'s (output, error) from layerfs and from Podman."""
    store, _, podman = images
    ours = subprocess.run(LAYERFS + ["logs", "--root", str(store), *flags, name], capture_output=True, check=True)
    theirs = subprocess.run(["podman", "logs", *flags, name], env=podman.env, capture_output=True, check=True)
    return (ours.stdout, ours.stderr), (theirs.stdout, theirs.stderr)


def _removed(images, name: str) -> None:
    store, _, podman = images
    layerfs("rm", "--root", store, name)
    podman("rm", name)


@pytest.mark.parametrize(
    "script, flags, shown",
    [
        ("echo a; echo b >&2; printf c; printf d >&2", (), (b"a\nc", b"b\nd")),  # partial last lines
        ("true", (), (b"", b"")),
        ("printf 'x\\001\\377y\\n\\000z'", (), (b"x\x01\xffy\n\x00z", b"")),  # binary bytes
        ("printf abc; sleep 0.3; echo def", (), (b"abcdef\n", b"")),  # a line written in two pieces
        (f"{_counting(30000)}; {_counting(20000)} >&2", (), (b"".join(b"%d\n" % i for i in range(30001)), None)),
        ("echo a; echo b >&2", ("-t",), (b"a\r\nb\r\n", b"")),  # a terminal: one stream, stdout
    ],
    ids=["streams", "empty", "binary", "pieces", "fast", "terminal"],
)
def test_logs_show_the_streams_as_podman_logs(box, script, flags, shown):  # noqa: F811
    _ran(box, "s", script, *flags)
    try:
        ours, theirs = _logs(box, "s")
        assert ours == theirs
        assert ours[0] == shown[0] and shown[1] in (None, ours[1])
    finally:
        _removed(box, "s")


def test_the_log_keeps_each_stream_and_its_times(box):  # noqa: F811
    store = box[0]
    _ran_here(box, "f", "echo out; echo err >&2; printf tail")
    # (the two streams are read as they come: their entries' order is the one written within each)
    entries = sorted((store / "containers/f/container.log").read_text().splitlines(), key=lambda e: e.split()[1:])
    assert [entry.split(" ", 1)[1] for entry in entries] == ["stderr F err", "stdout F out", "stdout P tail"]
    assert all(re.match(STAMP + " ", entry) for entry in entries)
    stamps = [entry.split()[0] for entry in entries]
    timed = layerfs("logs", "--root", store, "-t", "f")
    assert (timed.stdout, timed.stderr) == (f"{stamps[1]} out\n{stamps[2]} tail", f"{stamps[0]} err\n")
    layerfs("rm", "--root", store, "f")


def test_tail_as_podmans(box):  # noqa: F811
    _ran(box, "t", "for i in 1 2 3 4 5; do echo $i; done; echo e >&2")
    try:
        for n, out, err in (("2", b"5\n", b"e\n"), ("3", b"4\n5\n", b"e\n"), ("0", b"", b""), ("-1", None, b"e\n")):
            ours, theirs = _logs(box, "t", "--tail", n)
            assert ours == theirs and ours[1] == err and out in (None, ours[0])
        everything = subprocess.run(
            LAYERFS + ["logs", "--root", str(box[0]), "--tail", "all", "t"], capture_output=True
        )
        assert (everything.stdout, everything.stderr) == ours  # (docker's all is Podman's -1)
    finally:
        _removed(box, "t")


def test_since_and_until_take_the_lines_of_their_times(box):  # noqa: F811
    store = box[0]
    _ran_here(box, "u", "echo one; sleep 1.2; echo two")
    first, second = (line.split(" ", 1)[0] for line in layerfs("logs", "--root", store, "-t", "u").stdout.splitlines())
    shown = lambda *flags: layerfs("logs", "--root", store, *flags, "u").stdout  # noqa: E731
    assert shown("--since", second) == "two\n" and shown("--until", first) == "one\n"
    assert shown("--since", first, "--until", second) == "one\ntwo\n"
    assert shown("--since", "10m") == "one\ntwo\n" and shown("--until", "10m") == ""
    assert shown("--since", second.replace("+00:00", "Z")) == "two\n"
    unix = f"{calendar.timegm(time.strptime(second[:19], '%Y-%m-%dT%H:%M:%S'))}.{second[20:29]}"
    assert shown("--since", unix) == "two\n"
    assert shown("--since", "2000-01-01", "--until", "2000-01-02T00:00:00") == ""
    bad = layerfs("logs", "--root", store, "--since", "yesterday", "u", check=False)
    assert (bad.returncode, bad.stderr) == (
        2,
        "layerfs: --since yesterday: not a time (2026-12-08T04:45:00Z, a Unix time, or a duration such as 10m)\n",
    )
    layerfs("rm", "--root", store, "u")


def test_follow_gives_each_stream_its_lines_until_the_container_ends(box):  # noqa: F811
    store = box[0]
    script = "echo a; sleep 0.5; echo b >&2; sleep 0.5; echo c"
    layerfs("run", "--root", store, "-d", "--name", "w", "box:1", "sh", "-c", script)
    follower = subprocess.run(
        LAYERFS + ["logs", "--root", str(store), "-f", "w"], capture_output=True, text=True, timeout=60
    )
    assert (follower.returncode, follower.stdout, follower.stderr) == (0, "a\nc\n", "b\n")
    layerfs("rm", "--root", store, "w")

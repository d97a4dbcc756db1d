"""``layerfs example``: it runs, reports the changes its command made, and leaves nothing behind.

The diff it prints is checked two ways: against what its shell command did (a file written, one
edited, one deleted, from the constants the command is built of), and against Docker's two-tree
comparison of the kept store's image and the image committed from the container.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import layerfs, table_rows
from processes import pids_using, wait_for
from treediff import two_tree_changes

from layerfs import example

pytestmark = pytest.mark.root  # the example mounts and runs a container
LAYERFS = str(Path(sys.executable).with_name("layerfs"))
CHANGE_LINE = re.compile(r"^  ([ACD]) (/\S*)$")


def run_example(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([LAYERFS, "example", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def printed_changes(stdout: str) -> list[str]:
    section = stdout.split(f"$ layerfs diff {example.CONTAINER}", 1)[1].split("\n", 1)[1].split("\n\n", 1)[0]
    matches = [CHANGE_LINE.match(line) for line in section.splitlines()]
    assert all(matches), section
    return [f"{m[1]} {m[2]}" for m in matches]


def expected_changes() -> list[str]:
    """What the command did, with every ancestor directory changed, as docker diff lists it."""
    found = {example.NEW_FILE: "A", example.EDITED_FILE: "C", example.DELETED_FILE: "D"}
    for path in list(found):
        parent = Path(path).parent
        while str(parent) != "/":
            found.setdefault(str(parent), "C")
            parent = parent.parent
    return [f"{found[p]} {p}" for p in sorted(found, key=lambda p: p.split("/"))]


def assert_nothing_left_running(base: Path) -> None:
    assert not example.mounts_under(base)
    assert wait_for(lambda: not pids_using(base)), "a process (the daemon?) still holds the example's files"


def test_example_reports_what_its_command_did(tmp_path, mounts):
    base = tmp_path / "example"
    result = run_example("--dir", str(base))
    shown = printed_changes(result.stdout)
    assert shown == expected_changes()
    assert_nothing_left_running(base)

    # The same diff from outside: the kept store's image and the one committed from the container, compared whole.
    def lowers(image: str) -> list[str]:
        return layerfs("images", "--root", str(base / "store"), "--lowerdir", image).stdout.strip().split(":")

    before = mounts.layerfs(tmp_path / "image", lowers(example.IMAGE))
    after = mounts.layerfs(tmp_path / "committed", lowers(example.COMMITTED))
    assert two_tree_changes(before, after) == shown
    assert (after / example.NEW_FILE.lstrip("/")).read_text() in result.stdout
    # The --rm run left nothing; the container that made the changes is kept, stopped.
    listed = table_rows(layerfs("ps", "-a", "--root", str(base / "store")).stdout)
    assert [(r["NAMES"], r["IMAGE"], r["STATUS"].split(" ")[0]) for r in listed] == [
        (example.CONTAINER, f"docker.io/library/{example.IMAGE}", "Exited")
    ]  # the image's full name


def test_example_shows_the_merged_layers_and_cleans_up_its_temporary_directory():
    result = run_example()
    base = Path(re.search(r"^layerfs example in (\S+)$", result.stdout, re.M)[1])
    assert not base.exists()
    assert printed_changes(result.stdout) == expected_changes()
    # Seen from inside: the update's .wh. file and opaque dir and the config's 0/0 whiteout applied.
    listing = result.stdout.split("$ ls /opt/app /var/cache/app\n", 1)[1].split("  $ ", 1)[0].split()
    assert listing == ["/opt/app:", "run.sh", "/var/cache/app:", "index"]


def test_example_dir_is_reusable_but_a_foreign_dir_is_refused(tmp_path):
    base = tmp_path / "example"
    run_example("--dir", str(base))
    assert printed_changes(run_example("--dir", str(base)).stdout) == expected_changes()

    foreign = tmp_path / "foreign"
    (foreign / "precious").mkdir(parents=True)
    result = subprocess.run([LAYERFS, "example", "--dir", str(foreign)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert result.stderr.startswith("layerfs: ") and len(result.stderr.splitlines()) == 1
    assert [p.name for p in foreign.iterdir()] == ["precious"]

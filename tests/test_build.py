"""``layerfs build`` against Buildah (Debian's, runc, this host's settings): the same Dockerfile and
context built by both over the same busybox image (made with umoci), the two images mounted and their
trees compared entry by entry (names, types, modes, owners, sizes, contents, symlink targets, xattrs,
hard links), and their configs field by field. Then the cache (a rebuild reuses every step, a changed
file reruns from its COPY, a changed build arg from its first use), errors (a failing RUN, a missing
source) and the image run by Podman after ``layerfs save``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest
from busybox_images import BUSYBOX, busybox_tree, one_layer_layout
from conftest import is_mounted, layerfs
from snapshot import assert_same, snapshot
from test_podman import Podman

from benchmarks.podman import BUD_FLAGS

pytestmark = pytest.mark.root  # containers: namespaces, mounts
TOOLS = ("sh", "echo", "cat", "ls", "mkdir", "touch", "ln", "id", "env", "chmod", "chown", "rm", "false", "sed")
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\nstaff:x:50:app\napp:x:1000:\n"

DOCKERFILE = """\
ARG BASE=box:1
FROM $BASE AS builder
ARG VERSION=1
RUN mkdir -p /out && echo "built $VERSION" > /out/result && ln /out/result /out/hardlink
RUN ["sh", "-c", "echo exec form > /out/exec && chmod 0750 /out/exec && chown 1000:50 /out/exec"]

FROM $BASE
ARG VERSION
ENV APP=/srv/app GREETING="hello world"
WORKDIR $APP
COPY app.py config/*.conf ./
COPY --chown=app:staff --chmod=0640 data /srv/data/
COPY --from=builder /out/ /srv/out/
COPY tree /srv/tree
ADD bundle.tar.gz /opt/
ADD notes.txt /opt/notes/
SHELL ["/bin/sh", "-c"]
RUN echo "$GREETING $VERSION" > greeting && ln -s greeting link && rm /etc/motd
USER app
ENTRYPOINT ["/bin/sh", "-c"]
CMD ["cat greeting"]
LABEL org.example.name="the app" version=$VERSION
EXPOSE 8080 53/udp
VOLUME /srv/data
STOPSIGNAL SIGINT
HEALTHCHECK --interval=30s --retries=2 CMD cat /srv/app/greeting
"""


def _make_context(context: Path) -> None:
    (context / "config").mkdir(parents=True)
    (context / "app.py").write_text("print('app')\n")
    (context / "app.py").chmod(0o755)
    os.setxattr(context / "app.py", "user.origin", b"context")
    (context / "config/a.conf").write_text("a\n")
    (context / "config/b.conf").write_text("b\n")
    (context / "config/ignored.txt").write_text("not copied: no glob names it\n")
    (context / "data/deep").mkdir(parents=True)
    (context / "data/one").write_text("1\n")
    (context / "data/deep/two").write_text("2\n")
    (context / "data/secret.key").write_text("left out by .dockerignore\n")
    (context / "data/deep/public.key").write_text("an exception in .dockerignore\n")
    (context / "tree/sub").mkdir(parents=True)
    (context / "tree/sub/file").write_text("in a tree\n")
    os.link(context / "tree/sub/file", context / "tree/linked")
    os.symlink("sub/file", context / "tree/symlink")
    (context / "tree/sub").chmod(0o700)
    (context / ".dockerignore").write_text("# comments too\n**/*.key\n!data/deep/public.key\n")
    (context / "notes.txt").write_text("a plain file, which ADD copies\n")
    bundle = context / "bundle"
    (bundle / "pkg").mkdir(parents=True)
    (bundle / "pkg/tool").write_text("#!/bin/sh\n")
    (bundle / "pkg/tool").chmod(0o755)
    with tarfile.open(context / "bundle.tar.gz", "w:gz") as tar:
        tar.add(bundle / "pkg", arcname="pkg")
    shutil.rmtree(bundle)
    (context / "Dockerfile").write_text(DOCKERFILE)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(layerfs's store, the Podman whose storage Buildah shares, the base dir): box:1 in both."""
    base = tmp_path_factory.mktemp("build")
    root = busybox_tree(base / "rootfs", TOOLS, dirs=("home/app", "srv"), passwd=PASSWD, group=GROUP)
    (root / "tmp").chmod(0o1777)
    (root / "etc/motd").write_text("removed by a RUN\n")
    layout, store = one_layer_layout(base, root, "1"), base / "store"
    layerfs("import", "--root", store, f"oci:{layout}:1", "box:1")
    podman = Podman(Path(tempfile.mkdtemp(prefix="lfsbd-")), None)
    try:
        image_id = podman("pull", "-q", f"oci:{layout}:1").stdout.split()[-1]
        podman("tag", image_id, "docker.io/library/box:1")
        yield store, podman, base
    finally:
        podman.clean_up()
        shutil.rmtree(podman.base)


def build(store: Path, context: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return layerfs("build", "--root", store, *args, context, check=check)


def buildah(podman: Podman, *args: str | os.PathLike) -> subprocess.CompletedProcess:
    result = subprocess.run(["buildah", *map(str, args)], env=podman.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"buildah {args} failed: {result.stderr}"
    return result


def buildah_bud(podman: Podman, context: Path, *args: str) -> subprocess.CompletedProcess:
    return buildah(podman, "bud", *BUD_FLAGS, *args, context)


# What Buildah's RUN leaves in an image and docker's does not (nor layerfs's): the mount points and files
# its runtime needed; and its image's root directory, 0555 where the base layer's is 0755.
BUILDAH_RUN_LEFTOVERS = (".", "dev", "proc", "sys", "run", "etc/hostname")
CONFIG_FIELDS = (
    "Env",
    "Entrypoint",
    "Cmd",
    "WorkingDir",
    "User",
    "Labels",
    "ExposedPorts",
    "Volumes",
    "StopSignal",
)


def test_the_same_files_and_config_as_buildah(images, tmp_path):
    store, podman, _ = images
    context = tmp_path / "context"
    _make_context(context)
    build(store, context, "-t", "built:1", "--build-arg", "VERSION=2")
    buildah_bud(podman, context, "-t", "localhost/built:1", "--build-arg", "VERSION=2")

    ours = json.loads(layerfs("inspect", "--root", store, "built:1").stdout)["config"]["config"]
    theirs = json.loads(buildah(podman, "inspect", "--type", "image", "localhost/built:1").stdout)["OCIv1"]["config"]
    theirs["Labels"].pop("io.buildah.version")  # (Buildah's own)
    for name in CONFIG_FIELDS:
        assert ours.get(name) == theirs.get(name), name
    assert ours["Healthcheck"] == {"Test": ["CMD-SHELL", "cat /srv/app/greeting"], "Interval": 30 * 10**9, "Retries": 2}

    assert_same_trees(store, "built:1", podman, "localhost/built:1", tmp_path / "mine")


def assert_same_trees(store: Path, ours: str, podman: Podman, theirs: str, mountpoint: Path) -> None:
    """Image ``ours`` of the store and ``theirs`` of Buildah's, mounted: the same entries."""
    layerfs("create", "--root", store, "--name", "compare", ours)
    mountpoint.mkdir()
    layerfs("mount", "--root", store, "compare", mountpoint)
    try:
        where = podman("image", "mount", theirs).stdout.strip()
        try:
            ours_tree, theirs_tree = snapshot(mountpoint), snapshot(where)
            assert not {"dev", "proc", "sys", "run", "etc/hostname"} & set(ours_tree.entries)
            for path in BUILDAH_RUN_LEFTOVERS:
                for tree in (ours_tree, theirs_tree):
                    tree.entries.pop(path, None)
                    tree.inodes.pop(path, None)
            assert_same(ours_tree, theirs_tree, what="trees", ignore=("mtime",), names=("layerfs", "buildah"))
        finally:
            podman("image", "unmount", theirs)
    finally:
        layerfs("umount", mountpoint)
        layerfs("rm", "--root", store, "compare")
    assert not is_mounted(mountpoint)


def _steps(output: str) -> list[tuple[str, str]]:
    """(instruction, CACHED or DONE) for each step of a build's output."""
    lines = output.splitlines()
    found, current = [], {}
    for line in lines:
        m = re.match(r"#(\d+) \[\d+/\d+\] (.*)", line)
        if m:
            current[m.group(1)] = m.group(2)
            continue
        m = re.match(r"#(\d+) (CACHED|DONE)", line)
        if m and m.group(1) in current:
            found.append((current.pop(m.group(1)), m.group(2)))
    return found


def test_the_cache_reuses_steps_until_what_they_depend_on_changes(images, tmp_path):
    store, _, _ = images
    context = tmp_path / "context"
    context.mkdir()
    (context / "a.txt").write_text("a\n")
    (context / "b.txt").write_text("b\n")
    (context / "Dockerfile").write_text(
        "FROM box:1\nCOPY a.txt /a.txt\nRUN echo run1 > /r1\nARG FLAVOUR=plain\nENV X=1\n"
        'COPY b.txt /b.txt\nRUN echo $FLAVOUR > /flavour\nCMD ["cat", "/flavour"]\n'
    )
    first = build(store, context, "-t", "cached:1")
    assert [status for _, status in _steps(first.stdout)][1:] == ["DONE"] * 6
    image_id = first.stdout.split("writing image ")[1].split()[0]

    again = build(store, context, "-t", "cached:1")
    assert [status for _, status in _steps(again.stdout)][1:] == ["CACHED"] * 6
    assert again.stdout.split("writing image ")[1].split()[0] == image_id  # the same image, by id

    (context / "b.txt").write_text("b changed\n")
    changed = build(store, context, "-t", "cached:2")
    assert [status for _, status in _steps(changed.stdout)][1:] == ["CACHED"] * 3 + ["DONE"] * 3

    argued = build(store, context, "-t", "cached:3", "--build-arg", "FLAVOUR=spicy")
    assert [status for _, status in _steps(argued.stdout)][1:] == ["CACHED"] * 4 + ["DONE"] * 2
    ran = layerfs("run", "--root", store, "--rm", "cached:3")
    assert ran.stdout == "spicy\n"

    fresh = build(store, context, "-t", "cached:3", "--no-cache")
    assert [status for _, status in _steps(fresh.stdout)][1:] == ["DONE"] * 6


def test_a_failing_run_shows_its_output_and_leaves_nothing(images, tmp_path):
    store, _, _ = images
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM box:1\nENV A=1\nRUN echo made > /x && echo about to fail && false\n")
    before = layerfs("ps", "--root", store).stdout
    failed = build(store, context, "-t", "failed:1", check=False)
    assert failed.returncode == 1
    assert "about to fail" in failed.stdout
    assert "Dockerfile:3: RUN: /bin/sh -c echo made > /x && echo about to fail && false: exit code 1" in failed.stderr
    assert "failed" not in layerfs("images", "--root", store).stdout
    assert layerfs("ps", "--root", store).stdout == before
    assert not [p for p in os.listdir(store / "containers") if p.startswith("build-")]


def test_a_missing_source_names_its_line(images, tmp_path):
    store, _, _ = images
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text("FROM box:1\n\n# a comment\nCOPY app.py /app/\n")
    failed = build(store, context, check=False)
    assert failed.returncode == 1
    assert failed.stderr.strip() == "layerfs: Dockerfile:4: COPY: app.py: no such file in the context"

    (context / "Dockerfile").write_text("FROM box:1\nADD https://example.com/x.tar /x/\n")
    failed = build(store, context, check=False)
    assert failed.stderr.strip() == "layerfs: Dockerfile:2: ADD: https://example.com/x.tar: URLs are not supported"


def test_add_refuses_a_tar_that_reaches_out_of_its_destination(images, tmp_path):
    store, _, _ = images
    context = tmp_path / "context"
    context.mkdir()
    up = tarfile.TarInfo("up")  # (a symlink out, then a file through it)
    up.type, up.linkname = tarfile.SYMTYPE, "../../../../.."
    for name, members in (
        ("dotdot.tar", [tarfile.TarInfo("../../out")]),
        ("link.tar", [up, tarfile.TarInfo("up/out")]),
    ):
        with tarfile.open(context / name, "w") as tar:
            for member in members:
                tar.addfile(member)
        (context / "Dockerfile").write_text(f"FROM box:1\nADD {name} /opt/\n")
        failed = build(store, context, check=False)
        expected = f"layerfs: Dockerfile:2: ADD: {name}: {members[-1].name}: reaches outside /opt/\n"
        assert failed.returncode == 1 and failed.stderr == expected, failed.stderr


def test_target_builds_only_that_stage_and_what_it_needs(images, tmp_path):
    store, _, _ = images
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        "FROM box:1 AS base\nRUN echo base > /base\n"
        "FROM scratch AS unused\nCOPY Dockerfile /\n"
        "FROM base AS app\nRUN echo app > /app\n"
        "FROM app\nRUN echo last > /last\n"
    )
    built = build(store, context, "-t", "target:1", "--target", "app")
    assert "COPY Dockerfile" not in built.stdout and "/last" not in built.stdout
    ran = layerfs("run", "--root", store, "--rm", "target:1", "cat", "/base", "/app")
    assert ran.stdout == "base\napp\n"
    assert layerfs("run", "--root", store, "--rm", "target:1", "ls", "/last", check=False).returncode != 0


def test_scratch_and_the_image_runs_under_podman_after_save(images, tmp_path):
    store, podman, _ = images
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy2(BUSYBOX, context / "busybox")
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nENTRYPOINT ["/bin/busybox"]\nCMD ["echo", "from scratch"]\n'
    )
    build(store, context, "-t", "localhost/tiny:1")
    archive = tmp_path / "tiny.tar"
    layerfs("save", "--root", store, "localhost/tiny:1", f"oci-archive:{archive}")
    image_id = podman("load", "-q", "-i", archive).stdout.split()[-1]
    assert podman("run", "--rm", image_id).stdout == "from scratch\n"
    assert podman("run", "--rm", image_id, "echo", "args").stdout == "args\n"
    assert not is_mounted(tmp_path)


CONFIG_DOCKERFILE = """\
FROM box:1
ARG SIGNAL=SIGQUIT
ENV OLD_FORM value with spaces
ENV A=1 B=$A C="${A}x"
CMD ["kept", "until", "an", "entrypoint"]
ENTRYPOINT exec /bin/sh -c 'echo shell form'
CMD echo through the shell
SHELL ["/bin/sh", "-ec"]
WORKDIR /srv
WORKDIR relative/$A
USER 1000:50
LABEL one=1 "two words"="2" three=$SIGNAL
EXPOSE 7000/tcp 7001 9000/udp
VOLUME ["/var/lib/one", "/var/lib/two"]
STOPSIGNAL $SIGNAL
"""


def test_config_instructions_as_buildah_sets_them(images, tmp_path):
    # (Where Buildah 1.28 differs from docker, layerfs follows docker, and the Dockerfile keeps out of the
    # way: SHELL comes after CMD, since Buildah does not apply it to CMD and ENTRYPOINT; EXPOSE has no port
    # range, which Buildah keeps as one key, "7000-7002/tcp", and docker makes a key per port.)
    store, podman, _ = images
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(CONFIG_DOCKERFILE)
    build(store, context, "-t", "configured:1")
    buildah_bud(podman, context, "-t", "localhost/configured:1")
    ours = json.loads(layerfs("inspect", "--root", store, "configured:1").stdout)["config"]
    theirs = json.loads(buildah(podman, "inspect", "--type", "image", "localhost/configured:1").stdout)["OCIv1"]
    theirs["config"]["Labels"].pop("io.buildah.version")
    for name in CONFIG_FIELDS:
        assert ours["config"].get(name) == theirs["config"].get(name), name
    # Config steps add no layer; the second WORKDIR makes its directory, which the image lacks.
    made = [h["created_by"] for h in ours["history"][1:] if not h.get("empty_layer")]
    assert made == ["WORKDIR relative/$A"]
    assert_same_trees(store, "configured:1", podman, "localhost/configured:1", tmp_path / "mine")


def test_copy_follows_the_images_symlinks_inside_it_never_to_the_host(tmp_path):
    root = tmp_path / "rootfs"
    (root / "usr/lib").mkdir(parents=True)
    os.symlink("usr/lib", root / "lib")
    os.symlink("/etc", root / "hostetc")  # the image's /etc, which it lacks; never the host's
    with tarfile.open(tmp_path / "rootfs.tar", "w") as tar:
        tar.add(root, arcname=".")
    store, context = tmp_path / "store", tmp_path / "context"
    layerfs("import", "--root", store, f"rootfs:{tmp_path / 'rootfs.tar'}", "links:1")
    context.mkdir()
    (context / "x").write_text("x\n")
    (context / "Dockerfile").write_text("FROM links:1\nCOPY x /lib/x\nCOPY x /hostetc/layerfs-build-escaped\n")
    build(store, context, "-t", "links:2")
    assert not os.path.exists("/etc/layerfs-build-escaped")
    layerfs("create", "--root", store, "--name", "look", "links:2")
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    layerfs("mount", "--root", store, "look", mounted)
    try:
        assert (mounted / "usr/lib/x").read_text() == "x\n"
        assert (mounted / "etc/layerfs-build-escaped").read_text() == "x\n"
    finally:
        layerfs("umount", mounted)

"""``layerfs run`` picks the process as docker does: Entrypoint and Cmd, ``--entrypoint``, the user (by
name or number, from the container's own /etc/passwd and /etc/group), the environment (``-e K``,
``--env-file``, HOME) and the working directory. The images are made with umoci (an OCI layout whose
configs set Entrypoint, Cmd, User, Env), imported by layerfs and pulled by Podman (runc, this host's
settings), and the same command under both prints the same.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from busybox_images import busybox_tree, one_layer_layout, umoci
from conftest import layerfs, runc_run, table_rows
from test_podman import Podman

pytestmark = pytest.mark.root  # containers: namespaces, mounts, setuid
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534::/nonexistent:/bin/sh\n"
)
GROUP = "root:x:0:\nwheel:x:10:root,app\nstaff:x:50:app\napp:x:1000:\nnogroup:x:65534:\n"
# tag: umoci config flags
CONFIGS = {
    "plain": [],
    "shell": ["--config.entrypoint", "/bin/sh", "--config.entrypoint", "-c", "--config.cmd", "echo default"],
    "app": ["--config.user", "app", "--config.env", "FOO=image", "--config.env", "PATH=/bin"]
    + ["--config.workingdir", "/srv/work"],
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The CONFIGS as images: (layerfs's store, {tag: Podman's image id}, the Podman)."""
    base = tmp_path_factory.mktemp("process")
    tools = ("sh", "echo", "env", "id", "pwd", "stat", "sort", "grep", "cat")
    root = busybox_tree(base / "rootfs", tools, dirs=("home/app",), passwd=PASSWD, group=GROUP)
    os.chown(root / "home/app", 1000, 1000)
    layout, store = one_layer_layout(base, root, "plain"), base / "store"
    for tag, flags in CONFIGS.items():
        if flags:
            umoci("config", "--image", f"{layout}:plain", "--tag", tag, *flags)
    podman = Podman(Path(tempfile.mkdtemp(prefix="lfspm-")), None)
    try:
        ids = {}
        for tag in CONFIGS:
            layerfs("import", "--root", store, f"oci:{layout}:{tag}", f"box:{tag}")
            ids[tag] = podman("pull", "-q", f"oci:{layout}:{tag}").stdout.split()[-1]
        yield store, ids, podman
    finally:
        podman.clean_up()
        shutil.rmtree(podman.base)


def _both(images, tag: str, *words: str, flags: tuple[str, ...] = ()) -> tuple[subprocess.CompletedProcess, str]:
    """``layerfs run`` and ``podman run`` of image ``tag`` with ``flags`` and ``words``: layerfs's result and
    Podman's output."""
    store, ids, podman = images
    ours = layerfs("run", "--root", store, "--rm", "--hostname", "h", *flags, f"box:{tag}", *words, check=False)
    theirs = podman("run", "--rm", "--hostname", "h", *flags, ids[tag], *words, check=False)
    assert ours.stdout == theirs.stdout, (ours.stderr, theirs.stderr)
    return ours, theirs.stdout


@pytest.mark.parametrize(
    "flags, words, expected",
    [
        ((), (), "default\n"),  # Entrypoint + Cmd
        ((), ("echo override",), "override\n"),  # a command replaces Cmd, the Entrypoint stays
        (("--entrypoint", "/bin/echo"), ("a", "b"), "a b\n"),
        (("--entrypoint", "/bin/echo"), (), "\n"),  # the image's Cmd goes with its Entrypoint
        (("--entrypoint", ""), ("/bin/echo", "x"), "x\n"),
    ],
)
def test_entrypoint_and_cmd(images, flags, words, expected):
    ours, _ = _both(images, "shell", *words, flags=flags)
    assert ours.returncode == 0 and ours.stdout == expected, ours.stderr


# Podman differs from docker in two: root's own group is not among its groups, and a uid missing from
# passwd gets a line added there; those are checked against docker's output only.
@pytest.mark.parametrize(
    "tag, user, expected, as_podman",
    [
        ("plain", None, "uid=0(root) gid=0(root) groups=0(root),10(wheel) /root", False),
        ("app", None, "uid=1000(app) gid=1000(app) groups=10(wheel),50(staff),1000(app) /home/app", True),
        ("app", "0", "uid=0(root) gid=0(root) groups=0(root),10(wheel) /root", False),
        ("plain", "nobody", "uid=65534(nobody) gid=65534(nogroup) groups=65534(nogroup) /nonexistent", True),
        ("plain", "1000", "uid=1000(app) gid=1000(app) groups=10(wheel),50(staff),1000(app) /home/app", True),
        ("plain", "4242", "uid=4242 gid=0(root) groups=0(root) /", False),  # a number not in passwd
        ("plain", "app:staff", "uid=1000(app) gid=50(staff) groups=50(staff) /home/app", True),
        ("plain", "1000:10", "uid=1000(app) gid=10(wheel) groups=10(wheel) /home/app", True),
    ],
)
def test_the_user_is_the_containers(images, tag, user, expected, as_podman):
    flags = ("-u", user) if user else ()
    words = ("/bin/sh", "-c", 'echo "$(id) $HOME"')
    if as_podman:
        ours, _ = _both(images, tag, *words, flags=flags)
    else:
        ours = layerfs("run", "--root", images[0], "--rm", *flags, f"box:{tag}", *words, check=False)
    assert ours.stdout == expected + "\n", ours.stderr


def test_a_user_not_in_the_containers_passwd_is_one_line(images):
    store = images[0]
    result = layerfs("run", "--root", store, "--rm", "-u", "nobody2", "box:plain", "/bin/true", check=False)
    assert result.returncode == 125
    assert result.stderr == "layerfs: run: unable to find user nobody2: no matching entries in passwd file\n"


def test_the_environment(images, tmp_path, monkeypatch):
    monkeypatch.setenv("FROM_HOST", "host value")
    monkeypatch.setitem(images[2].env, "FROM_HOST", "host value")
    monkeypatch.delenv("NOT_ON_HOST", raising=False)
    env_file = tmp_path / "env"
    env_file.write_text("# a comment\n\nFILED=from file\nFOO=file\nFROM_HOST\n")
    flags = ("--env-file", str(env_file), "-e", "FLAGGED=1", "-e", "FROM_HOST", "-e", "NOT_ON_HOST")
    script = "env | grep -v -E '^(container|TERM|SHLVL|PWD|_)=' | sort"
    ours, _ = _both(images, "app", "/bin/sh", "-c", script, flags=flags)
    assert ours.stdout.splitlines() == [
        "FILED=from file",
        "FLAGGED=1",
        "FOO=file",
        "FROM_HOST=host value",
        "HOME=/home/app",
        "HOSTNAME=h",
        "PATH=/bin",
    ], ours.stderr
    given = _both(images, "plain", "/bin/sh", "-c", "echo $HOME $PATH", flags=("-e", "HOME=/elsewhere"))[0]
    assert given.stdout == "/elsewhere /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"


def test_a_missing_workdir_is_made_for_the_user(images):
    script = "pwd; stat -c '%u:%g %a' . /srv"
    ours, _ = _both(images, "app", "/bin/sh", "-c", script)  # the image's WorkingDir
    assert ours.stdout == "/srv/work\n1000:1000 755\n0:0 755\n", ours.stderr
    # -w: the same (Podman 4.3 refuses a -w that is missing, docker makes it)
    store = images[0]
    flagged = layerfs(
        "run", "--root", store, "--rm", "-u", "app", "-w", "/srv/work", "box:plain", "/bin/sh", "-c", script
    )
    assert flagged.stdout == ours.stdout


def test_a_relative_workdir_is_refused(images):
    result = layerfs("run", "--root", images[0], "--rm", "-w", "work", "box:plain", "/bin/true", check=False)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "absolute" in result.stderr


@pytest.mark.parametrize(
    "flags, image, code",
    [
        (("-u", "nobody2"), "box:plain", 125),  # a user the image's passwd lacks
        (("-w", "work"), "box:plain", 2),  # a bad flag value
        (("--entrypoint", ""), "box:plain", 2),  # no command at all
        ((), "box:missing", 1),  # no such image
    ],
)
def test_a_refused_run_leaves_no_container(images, flags, image, code):
    store = images[0]
    command = () if "--entrypoint" in flags else ("/bin/true",)
    result = layerfs("run", "--root", store, "--name", "refused", *flags, image, *command, check=False)
    assert result.returncode == code and result.stderr.count("\n") == 1, result.stderr
    assert not (store / "containers" / "refused").exists()


def test_a_bundle_runs_the_process_layerfs_run_would(images, tmp_path):
    """runc runs a bundle of an image with a User, Env and WorkingDir, with -e, as Podman runs the image."""
    store, ids, podman = images
    script = 'echo "$(id) $HOME $FOO $X $(pwd)"'
    layerfs("create", "--root", store, "--name", "bundled", "box:app")
    bundle = tmp_path / "bundle"
    try:
        layerfs("bundle", "--root", store, "-e", "X=1", "bundled", bundle, "--", "/bin/sh", "-c", script)
        ran = runc_run(bundle, "layerfs-bundle")
    finally:
        layerfs("rm", "--root", store, "bundled")
    theirs = podman("run", "--rm", "-e", "X=1", ids["app"], "/bin/sh", "-c", script).stdout
    assert (
        ran.stdout
        == theirs
        == "uid=1000(app) gid=1000(app) groups=10(wheel),50(staff),1000(app) /home/app image 1 /srv/work\n"
    ), ran.stderr


def test_images_in_dockers_columns(images):
    store, ids, podman = images
    listed = table_rows(layerfs("images", "--root", store).stdout)
    assert [(r["REPOSITORY"], r["TAG"]) for r in listed] == [("docker.io/library/box", tag) for tag in sorted(CONFIGS)]
    assert [r["IMAGE ID"] for r in listed] == [ids[tag][:12] for tag in sorted(CONFIGS)]  # Podman's ids
    assert all(r["CREATED"].endswith(" ago") and r["SIZE"].endswith("MB") for r in listed), listed
    quiet = layerfs("images", "--root", store, "-q").stdout.split()
    assert quiet == [r["IMAGE ID"] for r in listed]

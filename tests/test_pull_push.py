"""``layerfs pull`` and ``push`` against a real docker-registry on a loopback port (test_distribution's), with
skopeo, umoci and podman checking what layerfs pushed and saved: digests kept through every round trip, a
committed image that podman pulls and runs, an image podman pushed that layerfs pulls, and interrupted pulls
that leave the store as it was.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LAYERFS, layerfs, table_rows
from test_distribution import _free_port, _skopeo, _skopeo_inspect, auth_env, fake, image, registry  # noqa: F401
from test_podman import Podman

TLS = "--tls-verify=false"
# (auth_env, fake, image and registry above are test_distribution's fixtures, used here by name)


def _store_state(root: Path) -> dict[str, list[str]]:
    """What a store holds: its images, layers and blobs (names only), and its scratch space."""
    images = json.loads((root / "images.json").read_text()) if (root / "images.json").exists() else {}
    return {
        "images": sorted(images),
        "layers": sorted(os.listdir(root / "layers")),
        "blobs": sorted(os.listdir(root / "blobs/sha256")),
        "tmp": os.listdir(root / "tmp"),
    }


def _record(root: Path, name: str) -> dict:
    return json.loads(layerfs("inspect", "--root", root, name).stdout)


def _blob_gets(server, digest: str) -> int:  # noqa: ANN001 (test_distribution's Registry)
    return sum(r.startswith("GET ") and r.split()[1].endswith(f"/blobs/{digest}") for r in server.requests())


@pytest.mark.root  # the image's files are root's: unpacking gives them their owners
def test_pull_then_push_and_save_keep_every_digest(registry, image, tmp_path):  # noqa: F811
    root = tmp_path / "store"
    v2 = f"{registry.host}/test/busybox:v2"
    pulled = layerfs("pull", "--root", root, TLS, v2).stdout.splitlines()
    assert pulled == [f"Digest: {image['v2']}", v2]
    shared = _record(root, v2)["blobs"][0]
    fetched = _blob_gets(registry, shared)
    layerfs("pull", "--root", root, TLS, f"{registry.host}/test/busybox:base")
    assert _blob_gets(registry, shared) == fetched  # the store had it
    assert _record(root, f"{registry.host}/test/busybox:base")["manifest"] == image["base"]

    pushed = layerfs("push", "--root", root, TLS, v2, f"{registry.host}/copies/pushed:v2").stdout
    assert f"Digest: {image['v2']}" in pushed and "0 uploaded, 3 mounted" in pushed  # pulled from test/busybox
    assert _skopeo_inspect(f"docker://{registry.host}/copies/pushed:v2")["Digest"] == image["v2"]
    again = layerfs("push", "--root", root, TLS, v2).stdout  # where it came from: all there
    assert f"Digest: {image['v2']}" in again and "3 there already" in again

    record = _record(root, v2)
    for kind in ("oci", "oci-archive", "docker-archive"):
        dest = tmp_path / f"saved-{kind}"
        layerfs("save", "--root", root, "--format", kind, v2, dest)
        if kind == "docker-archive":  # no manifest digest in a docker archive: its config is the image's id
            # (its layers are the stored gzip blobs; skopeo reads them, and names them by their diff_ids)
            assert _skopeo_inspect(f"docker-archive:{dest}")["Layers"] == record["layers"]
            config = json.loads(_skopeo("inspect", "--config", f"docker-archive:{dest}"))
            assert config["rootfs"]["diff_ids"] == record["layers"]
        else:
            assert _skopeo_inspect(f"{kind}:{dest}:v2")["Digest"] == image["v2"]
        reimported = tmp_path / f"store-{kind}"
        name = layerfs("import", "--root", reimported, dest).stdout.splitlines()[0]
        assert _record(reimported, name)["config_digest"] == record["config_digest"]
        if kind != "docker-archive":
            assert _record(reimported, name)["manifest"] == image["v2"]
        else:
            assert name == v2  # its RepoTags


@pytest.mark.root  # run, podman
def test_a_committed_image_travels_to_podman_and_back(registry, image, tmp_path):  # noqa: F811
    root = tmp_path / "store"
    source = f"{registry.host}/test/busybox:v2"
    layerfs("pull", "--root", root, TLS, source)
    run = subprocess.run(
        LAYERFS
        + [
            "run",
            "--root",
            str(root),
            "--name",
            "c",
            "--net",
            "none",
            source,
            "/bin/sh",
            "-c",
            "echo made-here > /etc/made; rm /etc/new",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    layerfs("commit", "--root", root, "c", f"{registry.host}/app/committed:1")
    committed = _record(root, f"{registry.host}/app/committed:1")
    base = _record(root, source)
    assert committed["blobs"][:-1] == base["blobs"] and committed["config"]["created"]
    assert committed["config"]["history"][-1]["created_by"] == "layerfs commit"
    history = layerfs("history", "--root", root, f"{registry.host}/app/committed:1").stdout.splitlines()
    assert history[0].split()[:3] == ["IMAGE", "CREATED", "CREATED"] and "layerfs commit" in history[1]
    assert history[1].startswith(committed["config_digest"][7:19])

    pushed = layerfs("push", "--root", root, TLS, f"{registry.host}/app/committed:1").stdout
    assert "2 uploaded, 2 mounted" in pushed  # the new layer and config; the base's from where they came
    inspected = _skopeo_inspect(f"docker://{registry.host}/app/committed:1")
    assert inspected["Digest"] == committed["manifest"] and inspected["Layers"] == committed["blobs"]
    assert inspected["Created"] and inspected["Created"] != _skopeo_inspect(f"docker://{source}")["Created"]

    (tmp_path / "podman").mkdir()
    podman = Podman(tmp_path / "podman", None)  # (kernel overlayfs: what podman users have)
    try:
        podman("pull", TLS, f"{registry.host}/app/committed:1")
        result = podman(
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            "run",
            "--rm",
            "--network",
            "none",
            f"{registry.host}/app/committed:1",
            "/bin/sh",
            "-c",
            "cat /etc/made; ls /etc/new 2>&1 || true",
        )
        assert result.stdout.splitlines()[0] == "made-here" and "No such file" in result.stdout, (
            result.stdout,
            result.stderr,
        )
        podman("tag", f"{registry.host}/app/committed:1", f"{registry.host}/from/podman:1")
        podman("push", TLS, f"{registry.host}/from/podman:1")
    finally:
        podman.clean_up()
    back = tmp_path / "back"
    assert layerfs("pull", "--root", back, TLS, f"{registry.host}/from/podman:1").returncode == 0
    run = subprocess.run(
        LAYERFS
        + [
            "run",
            "--root",
            str(back),
            "--rm",
            "--net",
            "none",
            f"{registry.host}/from/podman:1",
            "/bin/busybox",
            "cat",
            "/etc/made",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.stdout == "made-here\n", run.stderr


@pytest.mark.root
def test_an_interrupted_pull_leaves_the_store_as_it_was(registry, image, fake, tmp_path):  # noqa: F811
    root = tmp_path / "store"
    layerfs("pull", "--root", root, TLS, f"{registry.host}/test/busybox:base")
    before = _store_state(root)
    for how in (signal.SIGKILL, signal.SIGINT):  # the fake's blob stalls halfway: the pull is under way
        puller = subprocess.Popen(
            LAYERFS + ["pull", "--root", str(root), TLS, f"{fake.host}/stalled-blob"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 20
        while not any(os.scandir(root / "tmp")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        puller.send_signal(how)
        assert puller.wait(30) == (130 if how == signal.SIGINT else -signal.SIGKILL)
        assert _store_state(root) | {"tmp": []} == before
    layerfs("gc", "--root", root)  # the next command to take the lock clears what a killed one left
    assert _store_state(root) == before


def test_a_bad_reference_and_an_unreachable_registry_are_one_line(tmp_path):
    for args, says in (
        (["pull", "bad name"], "is not a valid repository name"),
        (["pull", "../../etc"], "is not a valid registry name"),
        (["pull", f"127.0.0.1:{_free_port()}/app"], "cannot be reached"),
        (["tag", "x", "Bad"], "names are lowercase"),
    ):
        result = layerfs(*args, "--root", tmp_path / "store", check=False)
        assert result.returncode != 0 and says in result.stderr and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.root
def test_short_names_and_tags(registry, image, tmp_path):  # noqa: F811
    root = tmp_path / "store"
    layerfs("pull", "--root", root, TLS, f"{registry.host}/test/busybox:v2")
    assert (
        layerfs("tag", "--root", root, f"{registry.host}/test/busybox:v2", "busybox").stdout.strip()
        == "docker.io/library/busybox:latest"
    )
    assert json.loads(layerfs("inspect", "--root", root, "busybox").stdout)["manifest"] == image["v2"]
    listed = table_rows(layerfs("images", "--root", root).stdout)
    assert {(r["REPOSITORY"], r["TAG"]) for r in listed} == {
        ("docker.io/library/busybox", "latest"),
        (f"{registry.host}/test/busybox", "v2"),
    }
    assert len({r["IMAGE ID"] for r in listed}) == 1  # one image, two names


@pytest.mark.parametrize("guard", ["htpasswd", "token"])
def test_login_checks_the_credentials_and_logout_forgets_them(guard, tmp_path):
    from test_distribution import Registry, TokenServer

    if guard == "htpasswd":
        htpasswd = tmp_path / "htpasswd"
        subprocess.run(["htpasswd", "-Bbc", htpasswd, "me", "secret"], check=True, capture_output=True)
        tokens, auth = None, f"auth: {{htpasswd: {{realm: test, path: {htpasswd}}}}}"
    else:
        tokens = TokenServer(tmp_path)
        auth = (
            f"auth: {{token: {{realm: '{tokens.realm}', service: test-registry, issuer: test-issuer, "
            f"rootcertbundle: {tokens.cert}}}}}"
        )
    guarded = Registry(tmp_path / "guarded", auth)
    env = {**os.environ, "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
    try:

        def login(password: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                LAYERFS + ["login", "-u", "me", "--password-stdin", TLS, guarded.host],
                input=password + "\n",
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )

        refused = login("wrong")
        assert refused.returncode != 0 and refused.stderr.count("\n") == 1, refused.stderr
        assert ("access denied" if guard == "htpasswd" else "refused the login") in refused.stderr
        assert not (tmp_path / "auth.json").exists()
        assert login("secret").stdout == "Login Succeeded!\n"
        assert guarded.host in json.loads((tmp_path / "auth.json").read_text())["auths"]
        out = subprocess.run(LAYERFS + ["logout", guarded.host], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and json.loads((tmp_path / "auth.json").read_text())["auths"] == {}
    finally:
        guarded.stop()
        if tokens is not None:
            tokens.stop()


@pytest.mark.root
@pytest.mark.parametrize("kind", ["oci-archive", "docker-archive", "rootfs"])
def test_import_finds_out_what_a_file_is(kind, registry, image, tmp_path):  # noqa: F811
    made = tmp_path / "image.tar"
    if kind == "rootfs":
        (tmp_path / "tree/etc").mkdir(parents=True)
        (tmp_path / "tree/etc/hello").write_text("hi\n")
        subprocess.run(["tar", "-C", tmp_path / "tree", "-cf", made, "."], check=True)
    else:
        _skopeo(
            "copy",
            "--src-tls-verify=false",
            f"docker://{registry.host}/test/busybox:v2",
            f"{kind}:{made}:{'example.com/named/app:7' if kind == 'docker-archive' else 'v7'}",
        )
    root = tmp_path / "store"
    name = layerfs("load", "--root", root, "-i", made).stdout.splitlines()[0]
    assert (
        name
        == {
            "oci-archive": "docker.io/library/image:v7",
            "docker-archive": "example.com/named/app:7",
            "rootfs": "docker.io/library/image:latest",
        }[kind]
    )
    record = json.loads(layerfs("inspect", "--root", root, name).stdout)
    if kind == "oci-archive":
        assert record["manifest"] == image["v2"]
    if kind == "rootfs":
        assert record["config"]["created"] and record["config"]["history"][0]["created"]
        saved = tmp_path / "saved"
        layerfs("save", "--root", root, name, f"oci:{saved}:latest")
        assert _skopeo_inspect(f"oci:{saved}:latest")["Digest"] == record["manifest"]

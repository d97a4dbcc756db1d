"""The registry client against a real registry: Debian's docker-registry started here on a loopback port
(plain, behind htpasswd, and behind a token server), images put in by skopeo and checked by skopeo and umoci;
and against a small fake registry for the answers a real one does not give (wrong digests, huge manifests,
paths for digests, redirect loops, stalls). References and credential files are checked on their own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LAYERFS, layerfs, table_rows
from test_images import make_layout

from layerfs.distribution.auth import Credentials, find_credentials, parse_challenge, store_login
from layerfs.distribution.client import MAX_MANIFEST, OCI_INDEX, OCI_MANIFEST, Manifest, RegistryClient
from layerfs.distribution.pull import host_platform, parse_platform, pull
from layerfs.distribution.push import push
from layerfs.distribution.reference import Reference, parse_reference
from layerfs.errors import LayerfsError

# ---- references ----


@pytest.mark.parametrize(
    "text, expected",
    [
        ("busybox", Reference("docker.io", "library/busybox", "latest", None)),
        ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36", None)),
        ("docker.io/busybox", Reference("docker.io", "library/busybox", "latest", None)),
        ("index.docker.io/library/busybox", Reference("docker.io", "library/busybox", "latest", None)),
        ("user/app", Reference("docker.io", "user/app", "latest", None)),
        ("quay.io/team/app:v1", Reference("quay.io", "team/app", "v1", None)),
        ("127.0.0.1:5000/app:v1", Reference("127.0.0.1:5000", "app", "v1", None)),
        ("localhost/a/b__c/d-e", Reference("localhost", "a/b__c/d-e", "latest", None)),
        ("[::1]:5000/app", Reference("[::1]:5000", "app", "latest", None)),
        ("app@sha256:" + "a" * 64, Reference("docker.io", "library/app", None, "sha256:" + "a" * 64)),
        ("host:1/app:v2@sha256:" + "b" * 64, Reference("host:1", "app", "v2", "sha256:" + "b" * 64)),
    ],
)
def test_references_read_as_docker_reads_them(text, expected):
    assert parse_reference(text) == expected
    assert parse_reference(str(expected)) == expected


@pytest.mark.parametrize(
    "text, says",
    [
        ("bad name", "'bad name' is not a valid repository name"),
        ("../../etc", "'..' is not a valid registry name"),
        ("Busybox", "(names are lowercase)"),
        ("busybox:bad/tag", "'busybox:bad' is not a valid registry name"),
        ("busybox:-x", "'-x' is not a valid tag"),
        ("busybox@sha256:../../x", "is not a sha256 digest"),
        ("busybox@md5:abc", "is not a sha256 digest"),
        ("", "'' is not a valid repository name"),
        ("a" * 256, "longer than 255"),
    ],
)
def test_bad_references_are_refused_in_one_line(text, says):
    with pytest.raises(LayerfsError, match="^reference ") as caught:
        parse_reference(text)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_platforms():
    assert parse_platform("linux/arm64/v8") == ("linux", "arm64", "v8")
    assert str(parse_platform("linux/amd64")) == "linux/amd64"
    assert host_platform().os == "linux"
    with pytest.raises(LayerfsError, match="not OS/ARCH"):
        parse_platform("amd64")


# ---- credentials ----


@pytest.fixture
def auth_env(tmp_path, monkeypatch) -> Path:
    """Credential files looked for only under ``tmp_path``."""
    for name in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    return tmp_path


def _auth_file(path: Path, auths: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"auths": {k: {"auth": base64.b64encode(v.encode()).decode()} for k, v in auths.items()}})
    )


def test_credentials_are_found_where_podman_and_docker_keep_them(auth_env, monkeypatch):
    home = auth_env / "home"
    assert find_credentials("quay.io", "team/app") is None
    _auth_file(home / ".docker/config.json", {"https://index.docker.io/v1/": "hub:1", "quay.io": "docker:2"})
    assert find_credentials("docker.io", "library/busybox") == Credentials("hub", "1")
    assert find_credentials("quay.io", "team/app") == Credentials("docker", "2")
    _auth_file(home / ".config/containers/auth.json", {"quay.io/team": "team:3", "quay.io": "podman:4"})
    assert find_credentials("quay.io", "team/app") == Credentials("team", "3")  # the most specific key
    assert find_credentials("quay.io", "other/app") == Credentials("podman", "4")
    _auth_file(auth_env / "run/containers/auth.json", {"quay.io": "login:5"})
    assert find_credentials("quay.io", "team/app") == Credentials("login", "5")  # the first file wins
    _auth_file(auth_env / "elsewhere.json", {"quay.io": "env:6:with:colons"})
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_env / "elsewhere.json"))
    assert find_credentials("quay.io", "team/app") == Credentials("env", "6:with:colons")
    (auth_env / "elsewhere.json").write_text('{"auths": {"quay.io": {"auth": "!!"}}}')
    with pytest.raises(LayerfsError, match="not base64 of user:password"):
        find_credentials("quay.io")


@pytest.mark.root  # podman login, as root (rootless Podman needs a setup of its own)
def test_a_stored_login_is_found_and_kept_private(auth_env):
    path = store_login("127.0.0.1:5000", Credentials("me", "secret"))
    assert path == str(auth_env / "run/containers/auth.json")
    assert os.stat(path).st_mode & 0o777 == 0o600
    store_login("quay.io", Credentials("other", "x"))
    assert find_credentials("127.0.0.1:5000", "app") == Credentials("me", "secret")
    assert find_credentials("quay.io") == Credentials("other", "x")
    assert (
        subprocess.run(
            ["podman", "login", "--get-login", "--authfile", path, "127.0.0.1:5000"], capture_output=True, text=True
        ).stdout.strip()
        == "me"
    )


def test_challenges_are_parsed():
    assert parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull"'
    ) == (
        "bearer",
        {
            "realm": "https://auth.docker.io/token",
            "service": "registry.docker.io",
            "scope": "repository:library/busybox:pull",
        },
    )
    assert parse_challenge('Basic realm="a \\"quoted\\" realm"') == ("basic", {"realm": 'a "quoted" realm'})
    assert parse_challenge("Bearer realm=http://x/t, service=s") == ("bearer", {"realm": "http://x/t", "service": "s"})


# ---- a real registry ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Registry:
    """docker-registry on a loopback port, its requests logged to ``log``."""

    def __init__(self, base: Path, auth: str = "", tls: str = "") -> None:
        """``auth``: the config's auth section; ``tls``: its http.tls section, for https."""
        base.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log = base / "registry.log"
        config = base / "config.yml"
        config.write_text(f"""version: 0.1
log: {{level: info, formatter: text}}
storage: {{filesystem: {{rootdirectory: {base / "storage"}}}}}
http: {{addr: "{self.host}", secret: test{", tls: " + tls if tls else ""}}}
{auth}
""")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not start: {self.log.read_text()}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def requests(self) -> list[str]:
        """The requests it served, as ``METHOD PATH`` (its access log)."""
        return [
            line.split('"')[1]
            for line in self.log.read_text().splitlines()
            if '"' in line
            and " HTTP/" in line
            and line.split('"')[1].split(" ")[0] in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
        ]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Iterator[Registry]:
    server = Registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def image(tmp_path_factory, registry) -> dict[str, str]:
    """``test/busybox:v2`` and ``:base`` in the registry, copied in by skopeo; their manifest digests."""
    made = make_layout(tmp_path_factory.mktemp("image"))
    digests = {}
    for tag in ("base", "v2"):
        _skopeo("copy", "--dest-tls-verify=false", f"oci:{made}:{tag}", f"docker://{registry.host}/test/busybox:{tag}")
        digests[tag] = _skopeo_inspect(f"docker://{registry.host}/test/busybox:{tag}")["Digest"]
    return digests


def _skopeo(*args: str) -> str:
    result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"skopeo {' '.join(args)}: {result.stderr}"
    return result.stdout


def _skopeo_inspect(where: str) -> dict:
    tls = ["--tls-verify=false"] if where.startswith("docker://") else []
    return json.loads(_skopeo("inspect", *tls, where))


@pytest.mark.root  # the image is made by umoci, which gives its files their owners
def test_a_pulled_image_is_the_registrys_byte_for_byte(registry, image, tmp_path):
    seen: list[tuple[int, int | None, str]] = []
    pulled = pull(f"{registry.host}/test/busybox:v2", str(tmp_path / "oci"), progress=lambda *a: seen.append(a))
    assert pulled.manifest_digest == image["v2"]
    assert _skopeo_inspect(f"oci:{tmp_path / 'oci'}:v2")["Digest"] == image["v2"]
    assert seen and seen[-1][0] == seen[-1][1]
    for blob in (tmp_path / "oci/blobs/sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    result = subprocess.run(
        ["umoci", "unpack", "--image", f"{tmp_path / 'oci'}:v2", tmp_path / "bundle"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "bundle/rootfs/etc/new").read_text() == "new\n"
    store = tmp_path / "store"  # what a pull is until the store takes it directly: a layout, then import
    layerfs("import", "--root", store, f"oci:{tmp_path / 'oci'}:v2", "pulled:v2")
    listed = table_rows(layerfs("images", "--root", store).stdout)
    assert [(r["REPOSITORY"], r["TAG"]) for r in listed] == [("docker.io/library/pulled", "v2")]


@pytest.mark.root
def test_layers_the_caller_has_are_not_fetched(registry, image, tmp_path):
    base = pull(f"{registry.host}/test/busybox:base", str(tmp_path / "base"))
    base_layers = [d for d in base.fetched if d != base.config_digest]
    again = pull(f"{registry.host}/test/busybox:v2", str(tmp_path / "v2"), have=base_layers.__contains__)
    assert again.skipped == base_layers
    assert not set(base_layers) & set(again.fetched) and len(again.fetched) == 2  # its config and its own layer
    assert sorted(p.name for p in (tmp_path / "v2/blobs/sha256").iterdir()) == sorted(
        d.removeprefix("sha256:") for d in again.fetched + [again.manifest_digest]
    )


@pytest.mark.root
def test_an_interrupted_pull_leaves_no_blob_and_no_image(registry, image, tmp_path):
    def interrupt(done: int, total: int | None, label: str) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pull(f"{registry.host}/test/busybox:v2", str(tmp_path / "oci"), progress=interrupt)
    assert not (tmp_path / "oci/index.json").exists()
    assert not list((tmp_path / "oci/blobs/sha256").iterdir())


@pytest.mark.root
def test_a_pushed_image_keeps_its_digest_and_a_second_push_mounts_its_blobs(registry, image, tmp_path):
    pull(f"{registry.host}/test/busybox:v2", str(tmp_path / "oci"))
    first = push(str(tmp_path / "oci"), f"{registry.host}/copies/one:v2")
    assert first.manifest_digest == image["v2"]
    assert _skopeo_inspect(f"docker://{registry.host}/copies/one:v2")["Digest"] == image["v2"]
    assert len(first.uploaded) == 3 and not first.mounted  # its config and two layers, none there before

    second = push(str(tmp_path / "oci"), f"{registry.host}/copies/two:v2", mount_from="copies/one")
    assert second.mounted == first.uploaded and not second.uploaded
    assert _skopeo_inspect(f"docker://{registry.host}/copies/two:v2")["Digest"] == image["v2"]
    two = [r for r in registry.requests() if "/copies/two/" in r]
    assert any("mount=" in r for r in two)
    assert not [r for r in two if r.startswith(("PUT /v2/copies/two/blobs", "PATCH"))], two

    third = push(str(tmp_path / "oci"), f"{registry.host}/copies/two:again")
    assert sorted(third.present) == sorted(first.uploaded) and not third.uploaded


@pytest.mark.root
def test_a_chunked_push_gives_the_same_image(registry, image, tmp_path):
    pull(f"{registry.host}/test/busybox:v2", str(tmp_path / "oci"))
    pushed = push(str(tmp_path / "oci"), f"{registry.host}/chunked/app:v2", chunk_size=256 << 10)
    assert pushed.manifest_digest == image["v2"]
    assert _skopeo_inspect(f"docker://{registry.host}/chunked/app:v2")["Digest"] == image["v2"]
    assert sum(r.startswith("PATCH /v2/chunked/app/") for r in registry.requests()) > len(pushed.uploaded)
    bundle = tmp_path / "from-skopeo"
    _skopeo("copy", "--src-tls-verify=false", f"docker://{registry.host}/chunked/app:v2", f"oci:{bundle}:v2")
    assert _skopeo_inspect(f"oci:{bundle}:v2")["Digest"] == image["v2"]


@pytest.mark.root
def test_an_index_gives_the_image_for_the_platform(registry, image, tmp_path):
    here = host_platform()
    other = "s390x" if here.architecture != "s390x" else "amd64"
    entries = []
    for tag, arch in (("v2", here.architecture), ("base", other)):
        pull(f"{registry.host}/test/busybox:{tag}", str(tmp_path / tag))
        data = (tmp_path / tag / "blobs/sha256" / image[tag].removeprefix("sha256:")).read_bytes()
        platform = {"os": "linux", "architecture": arch, **({"variant": here.variant} if here.variant else {})}
        entries.append({"mediaType": OCI_MANIFEST, "digest": image[tag], "size": len(data), "platform": platform})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}).encode()
    with RegistryClient(registry.host, actions="pull,push") as client:
        client.put_manifest(
            "test/busybox", "multi", Manifest(index, OCI_INDEX, f"sha256:{hashlib.sha256(index).hexdigest()}")
        )
    assert pull(f"{registry.host}/test/busybox:multi", str(tmp_path / "a")).manifest_digest == image["v2"]
    assert (
        pull(f"{registry.host}/test/busybox:multi", str(tmp_path / "b"), platform=f"linux/{other}").manifest_digest
        == image["base"]
    )
    with pytest.raises(LayerfsError, match=r"no image for linux/mips \(it has linux/"):
        pull(f"{registry.host}/test/busybox:multi", str(tmp_path / "c"), platform="linux/mips")


@pytest.mark.root
def test_the_registrys_errors_are_one_line(registry, image, tmp_path):
    with pytest.raises(LayerfsError, match=r"^127.0.0.1:\d+: manifest test/busybox:nosuch: manifest unknown"):
        pull(f"{registry.host}/test/busybox:nosuch", str(tmp_path / "oci"))
    with pytest.raises(LayerfsError, match="cannot be reached: Connection refused"):
        pull(f"127.0.0.1:{_free_port()}/test/busybox:v2", str(tmp_path / "oci"))


@pytest.mark.root
def test_https_is_verified_unless_told_not_to(tmp_path, image, registry):
    key, cert = self_signed(tmp_path, "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1")
    secure = Registry(tmp_path / "tls", tls=f"{{certificate: {cert}, key: {key}}}")
    try:
        pull(f"{registry.host}/test/busybox:v2", str(tmp_path / "oci"))
        with pytest.raises(
            LayerfsError, match=f"^{secure.host}: TLS failed .*: certificate verify failed: self-signed certificate$"
        ):
            push(str(tmp_path / "oci"), f"{secure.host}/app:v2")
        assert push(str(tmp_path / "oci"), f"{secure.host}/app:v2", tls_verify=False).manifest_digest == image["v2"]
        assert pull(f"{secure.host}/app:v2", str(tmp_path / "back"), tls_verify=False).manifest_digest == image["v2"]
    finally:
        secure.stop()


# ---- logins: htpasswd, and bearer tokens from a token server ----


@pytest.mark.root
def test_basic_auth_with_a_stored_login(tmp_path, auth_env, image, registry):
    htpasswd = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-Bbc", htpasswd, "me", "secret"], check=True, capture_output=True)
    guarded = Registry(tmp_path / "guarded", f"auth: {{htpasswd: {{realm: test, path: {htpasswd}}}}}")
    try:
        pull(f"{registry.host}/test/busybox:v2", str(tmp_path / "oci"))
        target = f"{guarded.host}/private/app:v2"
        with pytest.raises(LayerfsError, match=f"{guarded.host}: needs a login"):
            push(str(tmp_path / "oci"), target)
        store_login(guarded.host, Credentials("me", "wrong"))
        with pytest.raises(LayerfsError, match="access denied to repository:private/app:pull,push"):
            push(str(tmp_path / "oci"), target)
        store_login(guarded.host, Credentials("me", "secret"))
        assert push(str(tmp_path / "oci"), target).manifest_digest == image["v2"]
        assert pull(target, str(tmp_path / "back")).manifest_digest == image["v2"]
    finally:
        guarded.stop()


def self_signed(base: Path, subject: str, *extra: str) -> tuple[Path, Path]:
    """A key and a self-signed certificate for ``subject`` (openssl req ``extra`` options), in ``base``."""
    key, cert = base / "key.pem", base / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
         "-subj", subject, *extra],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return key, cert


class TokenServer:
    """A token realm as docker's auth servers are: it signs (with openssl, RS256) a JWT granting what is asked
    for, to ``me``:``secret`` only; docker-registry checks the signature against ``cert``."""

    def __init__(self, base: Path) -> None:
        self.key, self.cert = self_signed(base, "/CN=token")
        der = subprocess.run(
            ["openssl", "x509", "-in", self.cert, "-outform", "DER"], check=True, capture_output=True
        ).stdout
        self.asked: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                from urllib.parse import parse_qs, urlparse

                query = parse_qs(urlparse(self.path).query)
                outer.asked.append(query)
                if self.headers.get("Authorization") != "Basic " + base64.b64encode(b"me:secret").decode():
                    self.send_response(401)
                    self.end_headers()
                    return
                access = [
                    {"type": "repository", "name": s.split(":")[1], "actions": s.split(":")[2].split(",")}
                    for s in query.get("scope", [])
                ]
                now = int(time.time())
                claims = {
                    "iss": "test-issuer",
                    "sub": "me",
                    "aud": query["service"][0],
                    "exp": now + 600,
                    "nbf": now - 10,
                    "iat": now,
                    "jti": str(now),
                    "access": access,
                }
                header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
                signed = ".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
                signature = subprocess.run(
                    ["openssl", "dgst", "-sha256", "-sign", outer.key],
                    input=signed.encode(),
                    check=True,
                    capture_output=True,
                ).stdout
                body = json.dumps({"token": f"{signed}.{_b64url(signature)}"}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.root
def test_bearer_tokens_from_the_registrys_token_server(tmp_path, auth_env, image, registry):
    tokens = TokenServer(tmp_path)
    guarded = Registry(
        tmp_path / "guarded",
        f"auth: {{token: {{realm: '{tokens.realm}', service: test-registry, "
        f"issuer: test-issuer, rootcertbundle: {tokens.cert}}}}}",
    )
    try:
        pull(f"{registry.host}/test/busybox:v2", str(tmp_path / "oci"))
        target = f"{guarded.host}/private/app:v2"
        with pytest.raises(LayerfsError, match="the token server refused the login"):
            push(str(tmp_path / "oci"), target)
        store_login(guarded.host, Credentials("me", "secret"))
        assert push(str(tmp_path / "oci"), target).manifest_digest == image["v2"]
        mounted = push(str(tmp_path / "oci"), f"{guarded.host}/private/copy:v2", mount_from="private/app")
        assert mounted.mounted and not mounted.uploaded
        assert pull(target, str(tmp_path / "back")).manifest_digest == image["v2"]
        assert {
            "service": ["test-registry"],
            "scope": ["repository:private/copy:pull,push", "repository:private/app:pull"],
        } in tokens.asked
        assert {"service": ["test-registry"], "scope": ["repository:private/app:pull"]} in tokens.asked
    finally:
        guarded.stop()
        tokens.stop()


# ---- hostile answers, from a fake registry ----


def _sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


class FakeRegistry:
    """A registry that misbehaves one way per repository (see ``_answer``); stalled answers wait for
    ``release``, set when the test is done."""

    CONFIG = b'{"rootfs": {"type": "layers", "diff_ids": ["sha256:' + b"0" * 64 + b'"]}}'
    LAYER = b"the layer's bytes" * 1000

    def __init__(self) -> None:
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer._answer(self)

            do_HEAD = do_POST = do_PUT = do_PATCH = do_GET  # (a push: only "stalled" answers them, stalling)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def manifest(self, config_digest: str | None = None) -> bytes:
        return json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest or _sha256(self.CONFIG),
                    "size": len(self.CONFIG),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": _sha256(self.LAYER),
                        "size": len(self.LAYER),
                    }
                ],
            }
        ).encode()

    def _answer(self, request: http.server.BaseHTTPRequestHandler) -> None:
        repository, _, rest = request.path.removeprefix("/v2/").partition("/")
        headers = {"Content-Type": OCI_MANIFEST}
        if request.path == "/v2/":
            body = b"{}"
        elif rest == "blobs/" + _sha256(self.CONFIG):
            body = self.CONFIG
        elif rest.startswith("blobs/"):
            body = self.LAYER.upper() if repository == "wrong-blob" else self.LAYER
            if repository == "stalled-blob":  # half the blob, then nothing
                request.send_response(200)
                request.send_header("Content-Length", str(len(body)))
                request.end_headers()
                request.wfile.write(body[: len(body) // 2])
                request.wfile.flush()
                self.release.wait(30)
                return
        elif repository == "redirect-loop":
            request.send_response(302)
            request.send_header("Location", request.path)
            request.end_headers()
            return
        elif repository == "stalled":  # whatever is asked
            self.release.wait(30)
            return
        elif repository == "huge":
            body, headers["Content-Length"] = b"", str(MAX_MANIFEST + 1)
        elif repository == "huge-unsized":  # no Content-Length: the body ends when the connection does
            request.send_response(200)
            request.end_headers()
            for _ in range(MAX_MANIFEST // 65536 + 2):
                request.wfile.write(b" " * 65536)
            return
        elif repository == "path-digest":
            body = self.manifest("sha256:../../../etc/passwd")
        elif repository == "lying-digest":
            body, headers["Docker-Content-Digest"] = self.manifest(), _sha256(b"another")
        else:
            body = self.manifest()
        request.send_response(200)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            request.send_header(name, value)
        request.end_headers()
        with contextlib.suppress(OSError):
            request.wfile.write(body)

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(auth_env) -> Iterator[FakeRegistry]:  # no credentials of the machine's
    server = FakeRegistry()
    yield server
    server.stop()


@pytest.mark.parametrize(
    "repository, says",
    [
        ("wrong-blob", r"blob sha256:\w+ does not match its digest"),
        ("huge", "manifest huge:latest is larger than 4 MiB"),
        ("huge-unsized", "manifest huge-unsized:latest is larger than 4 MiB"),
        ("path-digest", r"'sha256:../../../etc/passwd' is not a sha256 digest"),
        ("lying-digest", "manifest lying-digest:latest does not match its digest"),
        ("redirect-loop", "more than 8 redirects"),
        ("stalled", r"no answer within 0.5 s"),
        ("stalled-blob", r"no answer within 0.5 s"),
    ],
)
def test_hostile_answers_are_refused_and_leave_nothing(fake, tmp_path, repository, says):
    layout = tmp_path / "oci"
    with pytest.raises(LayerfsError, match=f"^{fake.host}[:/].*{says}") as caught:
        pull(f"{fake.host}/{repository}", str(layout), timeout=0.5)
    assert "\n" not in str(caught.value)
    assert not (layout / "index.json").exists()
    assert {p.name for p in (layout / "blobs/sha256").iterdir()} <= {_sha256(fake.CONFIG)[7:]}  # no partial blob


@pytest.mark.root  # the rootfs tar imported first has owners
@pytest.mark.parametrize(
    "command", [["pull", "stalled"], ["pull", "stalled-blob"], ["push", "flat:1", "stalled"]], ids=" ".join
)
def test_ctrl_c_ends_a_stalled_transfer_at_once_and_leaves_the_store_as_it_was(fake, tmp_path, command):
    """A stalled registry answers nothing (a manifest, the rest of a blob, a push's first question): Ctrl-C
    ends the command at once, not after the client's 30 s timeout, and nothing of it stays."""
    root = tmp_path / "store"
    (tmp_path / "rootfs/etc").mkdir(parents=True)
    (tmp_path / "rootfs/etc/motd").write_text("hi\n")
    subprocess.run(["tar", "-C", tmp_path / "rootfs", "-cf", tmp_path / "rootfs.tar", "."], check=True)
    layerfs("import", "--root", root, f"rootfs:{tmp_path / 'rootfs.tar'}", "flat:1")

    def state() -> dict[str, list[str]]:
        return {d: sorted(str(p.relative_to(root)) for p in (root / d).rglob("*")) for d in os.listdir(root)}

    before = state()
    verb, *args, repository = command
    with subprocess.Popen(
        [*LAYERFS, verb, "--root", root, "--tls-verify=false", *args, f"{fake.host}/{repository}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as command_run:
        time.sleep(2)  # well into the stall: the command is waiting for the registry
        assert command_run.poll() is None, command_run.stderr.read()
        interrupted = time.monotonic()
        command_run.send_signal(signal.SIGINT)
        _, stderr = command_run.communicate(timeout=30)
        took = time.monotonic() - interrupted
    assert command_run.returncode == 130 and stderr == "layerfs: interrupted\n", stderr
    assert took < 10, f"Ctrl-C took {took:.1f} s: it waited for the stalled transfer"  # (the timeout is 30 s)
    assert state() == before


def test_a_well_behaved_fake_gives_the_image(fake, tmp_path):
    pulled = pull(f"{fake.host}/fine:latest", str(tmp_path / "oci"))
    assert pulled.fetched == [_sha256(fake.CONFIG), _sha256(fake.LAYER)]
    assert (tmp_path / "oci/blobs/sha256" / _sha256(fake.LAYER)[7:]).read_bytes() == fake.LAYER

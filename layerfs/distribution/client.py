"""One registry over HTTP: its ``/v2/`` endpoints for manifests and blobs, with authentication, TLS and
errors as one line. What comes back is not trusted: a manifest is read only up to a limit and checked against
its digest, a blob is written to a temporary file, hashed as it streams, and renamed into place only when its
digest matches; every digest is checked for its form before it names a path or goes into a URL.

The registry is reached over https, its certificate verified; with ``tls_verify=False`` the certificate is not
checked and plain http is tried when https fails, as podman's ``--tls-verify=false`` does, and a registry on
this machine (localhost, 127.0.0.0/8, ::1) is tried over http too, as docker does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NamedTuple
from urllib.parse import urljoin

import requests
import urllib3

from ..errors import LayerfsError, printable
from ..oci.layout import checked_digest
from .auth import Authenticator, Credentials
from .parallel import Stopped
from .reference import DOCKER_HUB

MAX_MANIFEST = 4 << 20  # as containerd: a manifest or index larger than this is refused unread
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
_MAX_REDIRECTS = 8
_MAX_ERROR_BODY = 64 << 10
_BLOCK = 1 << 20
_LOOPBACK = ("localhost", "127.", "[::1]")


class Manifest(NamedTuple):
    data: bytes  # as the registry sent it: its digest is of these bytes
    media_type: str
    digest: str


class RegistryClient:
    """The registry ``registry`` (``host[:port]``, as in a Reference). ``actions`` are what the requests ask
    a bearer token for on each repository: ``pull``, or ``pull,push`` for a push."""

    def __init__(
        self,
        registry: str,
        credentials: Credentials | None = None,
        *,
        tls_verify: bool = True,
        timeout: float = 30.0,
        actions: str = "pull",
    ) -> None:
        self.registry, self.tls_verify, self.timeout, self.actions = registry, tls_verify, timeout, actions
        self._host = "registry-1.docker.io" if registry == DOCKER_HUB else registry
        self._session = requests.Session()
        self._session.max_redirects = _MAX_REDIRECTS
        if not tls_verify:  # asked for: not a warning on every request
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._auth = Authenticator(registry, credentials, self._session, timeout, tls_verify)
        self._base: str | None = None
        self._base_lock = threading.Lock()

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def scope(self, repository: str) -> str:
        return f"repository:{repository}:{self.actions}"

    def _base_url(self) -> str:
        """``https://host`` or, where allowed (see the module's doc) and https fails, ``http://host``."""
        with self._base_lock:
            if self._base is None:
                schemes = ["https"]
                if not self.tls_verify or self._host.startswith(_LOOPBACK):
                    schemes.append("http")
                for number, scheme in enumerate(schemes):
                    try:
                        self._session.get(
                            f"{scheme}://{self._host}/v2/", timeout=self.timeout, verify=self.tls_verify
                        ).close()
                    except requests.RequestException as e:
                        # a certificate refused is a TLS server there: not one to talk to in the clear
                        if number == len(schemes) - 1 or "CERTIFICATE_VERIFY_FAILED" in str(e):
                            raise self._unreachable(e) from None
                        continue
                    self._base = f"{scheme}://{self._host}"
                    break
            assert self._base is not None
            return self._base

    def _unreachable(self, e: requests.RequestException) -> LayerfsError:
        if isinstance(e, requests.TooManyRedirects):
            return LayerfsError(f"{self.registry}: more than {_MAX_REDIRECTS} redirects (a redirect loop?)")
        if isinstance(e, requests.Timeout | TimeoutError) or "timed out" in str(e):
            return LayerfsError(f"{self.registry}: no answer within {self.timeout:g} s")
        if isinstance(e, requests.exceptions.SSLError):
            return LayerfsError(f"{self.registry}: TLS failed (--tls-verify=false to skip it): {_reason(e)}")
        return LayerfsError(f"{self.registry}: cannot be reached: {_reason(e)}")

    def request(
        self, method: str, path: str, *, scope: str, ok: tuple[int, ...] = (200,), what: str, **kwargs: Any
    ) -> requests.Response:
        """Send ``method`` to ``path`` (``/v2/...``, or a URL the registry gave, such as an upload's Location),
        answering one authentication challenge; a status outside ``ok`` is a LayerfsError with the
        registry's own message, saying ``what`` failed."""
        url = urljoin(self._base_url(), path)
        data = kwargs.get("data")
        extra: dict = kwargs.pop("headers", {})
        for attempt in (1, 2):
            headers = {**extra, **self._auth.header(scope)}
            try:
                response = self._session.request(
                    method, url, headers=headers, timeout=self.timeout, verify=self.tls_verify, **kwargs
                )
            except requests.RequestException as e:
                raise self._unreachable(e) from None
            challenge = response.headers.get("WWW-Authenticate")
            if response.status_code != 401 or not challenge or attempt == 2:
                break
            response.close()
            self._auth.answer(challenge, scope)
            if hasattr(data, "seek"):
                data.seek(0)  # type: ignore[union-attr]
        if response.status_code == 401 and 401 not in ok:
            raise LayerfsError(f"{self.registry}: {what}: access denied to {scope} ({_error_message(response)})")
        if response.status_code not in ok:
            raise LayerfsError(f"{self.registry}: {what}: {_error_message(response)}")
        return response

    def get_manifest(self, repository: str, version: str) -> Manifest:
        """The manifest or index ``version`` (a tag or digest) of ``repository``, checked against the digest
        it is asked by, or the one the registry names (``Docker-Content-Digest``)."""
        what = f"{repository}:{version}" if not version.startswith("sha256:") else f"{repository}@{version}"
        accept = ", ".join(MANIFEST_TYPES + INDEX_TYPES)
        with self.request(
            "GET",
            f"/v2/{repository}/manifests/{version}",
            scope=self.scope(repository),
            headers={"Accept": accept},
            stream=True,
            what=f"manifest {what}",
        ) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > MAX_MANIFEST:
                raise LayerfsError(f"{self.registry}: manifest {what} is larger than {MAX_MANIFEST >> 20} MiB")
            data = b""
            for block in self._stream(response):
                data += block
                if len(data) > MAX_MANIFEST:
                    raise LayerfsError(f"{self.registry}: manifest {what} is larger than {MAX_MANIFEST >> 20} MiB")
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            named = response.headers.get("Docker-Content-Digest")
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        expected = version if version.startswith("sha256:") else named
        if expected and expected != digest:
            raise LayerfsError(f"{self.registry}: manifest {what} does not match its digest {printable(expected)}")
        return Manifest(data, media_type, digest)

    def fetch_blob(
        self,
        repository: str,
        digest: str,
        directory: str,
        size: int,
        on_bytes: Callable[[int], None] = lambda n: None,
        stop: threading.Event | None = None,
    ) -> str:
        """Download blob ``digest`` of ``size`` bytes into ``directory`` as ``<hex>``, checked as it streams
        (``on_bytes`` told of each block); nothing is left behind if it fails or ``stop`` is set."""
        hex_digest = checked_digest(digest, f"{self.registry}: {repository}").removeprefix("sha256:")
        final = os.path.join(directory, hex_digest)
        tmp = os.path.join(directory, f".{hex_digest}.{uuid.uuid4().hex}.part")
        hashed, received = hashlib.sha256(), 0
        try:
            with (
                self.request(
                    "GET",
                    f"/v2/{repository}/blobs/{digest}",
                    scope=self.scope(repository),
                    stream=True,
                    what=f"blob {digest}",
                ) as response,
                open(tmp, "wb") as out,
            ):
                for block in self._stream(response):
                    if stop is not None and stop.is_set():
                        raise Stopped
                    received += len(block)
                    if received > size:
                        raise LayerfsError(f"{self.registry}: blob {digest} is larger than its {size} bytes")
                    hashed.update(block)
                    out.write(block)
                    on_bytes(len(block))
            if received != size or f"sha256:{hashed.hexdigest()}" != digest:
                raise LayerfsError(f"{self.registry}: blob {digest} does not match its digest (or size {size})")
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return final

    def _stream(self, response: requests.Response) -> Iterator[bytes]:
        """The body's blocks; a stall or a dropped connection is a LayerfsError."""
        try:
            yield from response.iter_content(_BLOCK)
        except requests.RequestException as e:
            raise self._unreachable(e) from None

    def has_blob(self, repository: str, digest: str) -> bool:
        checked_digest(digest, f"{self.registry}: {repository}")
        response = self.request(
            "HEAD",
            f"/v2/{repository}/blobs/{digest}",
            scope=self.scope(repository),
            ok=(200, 404),
            what=f"blob {digest}",
        )
        return response.status_code == 200

    def start_upload(self, repository: str, digest: str, mount_from: str | None = None) -> Upload | None:
        """Begin putting blob ``digest`` into ``repository``: None if the registry mounted it from the
        repository ``mount_from`` (no bytes need to travel), else the upload to send it to."""
        scope = self.scope(repository) + (f" repository:{mount_from}:pull" if mount_from else "")
        params = {"mount": digest, "from": mount_from} if mount_from else None
        response = self.request(
            "POST",
            f"/v2/{repository}/blobs/uploads/",
            scope=scope,
            params=params,
            ok=(201, 202),
            what=f"upload of {digest}",
        )
        if response.status_code == 201:
            return None
        least = response.headers.get("OCI-Chunk-Min-Length", "")
        return Upload(self._location(response), int(least) if least.isdigit() else None)

    def _location(self, response: requests.Response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise LayerfsError(f"{self.registry}: an upload answer without a Location")
        return urljoin(response.url, location)

    def upload_blob(
        self,
        repository: str,
        location: str,
        digest: str,
        path: str,
        size: int,
        *,
        chunk_size: int | None = None,
        on_bytes: Callable[[int], None] = lambda n: None,
        stop: threading.Event | None = None,
    ) -> None:
        """Send the file ``path`` as blob ``digest`` to the upload at ``location``: in one PUT, or in PATCHes of
        ``chunk_size`` bytes and a closing PUT. ``stop`` set gives up between blocks (raising Stopped)."""
        scope = self.scope(repository)
        stop = stop or threading.Event()
        with open(path, "rb") as f:
            if chunk_size is None:
                self.request(
                    "PUT",
                    location,
                    scope=scope,
                    params={"digest": digest},
                    ok=(201,),
                    data=_Body(f, size, on_bytes, stop),
                    what=f"upload of {digest}",
                    headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                )
                return
            for start in range(0, size, chunk_size):
                if stop.is_set():
                    raise Stopped
                chunk = f.read(chunk_size)
                response = self.request(
                    "PATCH",
                    location,
                    scope=scope,
                    data=chunk,
                    ok=(202,),
                    headers={
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{start}-{start + len(chunk) - 1}",
                    },
                    what=f"upload of {digest}",
                )
                location = self._location(response)
                on_bytes(len(chunk))
        self.request(
            "PUT",
            location,
            scope=scope,
            params={"digest": digest},
            ok=(201,),
            what=f"upload of {digest}",
            headers={"Content-Length": "0"},
        )

    def put_manifest(self, repository: str, version: str, manifest: Manifest) -> None:
        """Store ``manifest``'s very bytes as ``version`` (a tag or its digest) of ``repository``."""
        response = self.request(
            "PUT",
            f"/v2/{repository}/manifests/{version}",
            scope=self.scope(repository),
            data=manifest.data,
            ok=(201,),
            headers={"Content-Type": manifest.media_type},
            what=f"manifest {repository}:{version}",
        )
        named = response.headers.get("Docker-Content-Digest")
        if named and named != manifest.digest:
            raise LayerfsError(f"{self.registry}: stored the manifest as {printable(named)}, not {manifest.digest}")


class Upload(NamedTuple):
    location: str  # where its bytes go
    min_chunk: int | None  # the least a PATCH may carry, if the registry says (OCI-Chunk-Min-Length)


class _Body:
    """A file sent as a request body: its length known (so no chunked encoding), each block counted."""

    def __init__(self, f: BinaryIO, size: int, on_bytes: Callable[[int], None], stop: threading.Event) -> None:
        self._f, self._size, self._on_bytes, self._stop = f, size, on_bytes, stop

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        if self._stop.is_set():
            raise Stopped
        data = self._f.read(n)
        self._on_bytes(len(data))
        return data

    def seek(self, offset: int) -> None:
        self._f.seek(offset)


def _reason(e: Exception) -> str:
    """What a requests error comes down to (``Connection refused``), not its pool's whole story."""
    found = re.search(r"\[(?:Errno -?\d+|SSL: \w+)\] ([^'\"()]+)", str(e))
    return printable(found.group(1).strip() if found else str(e) or type(e).__name__)


def _error_message(response: requests.Response) -> str:
    """The registry's own words for a failed request (its error JSON), else the HTTP status."""
    body = b""
    with contextlib.suppress(requests.RequestException):
        for block in response.iter_content(_MAX_ERROR_BODY):
            body = block
            break
    response.close()
    with contextlib.suppress(ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        error = json.loads(body)["errors"][0]
        detail = f"{error['message']} ({error['code']})" if error.get("code") else error["message"]
        return printable(f"{detail} (HTTP {response.status_code})")
    return f"HTTP {response.status_code} {printable(response.reason or '')}".strip()

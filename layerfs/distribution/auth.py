"""Who we are to a registry: credentials from the files podman and docker write, and the answers to a
registry's ``WWW-Authenticate`` challenge (HTTP basic, or a bearer token fetched from the challenge's realm).

Credential files, the first one holding an entry for the registry wins (containers-auth.json(5)):
``$REGISTRY_AUTH_FILE`` or ``$XDG_RUNTIME_DIR/containers/auth.json`` (where ``layerfs login`` writes, as
``podman login`` does), ``$XDG_CONFIG_HOME/containers/auth.json``, ``$DOCKER_CONFIG/config.json`` or
``~/.docker/config.json``. Each has ``{"auths": {KEY: {"auth": base64("user:password")}}}``; a KEY is a
registry (``quay.io``, or a URL as docker writes it, ``https://index.docker.io/v1/``) or a registry with a
repository's namespace (``quay.io/team``), the most specific one that matches is used.
Credential helpers (``credHelpers``, ``credsStore``) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import tempfile
import threading
from typing import NamedTuple

import requests

from ..errors import LayerfsError, printable

_PARAM = re.compile(r'\s*([A-Za-z][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,"]*))\s*,?')
_HUB_KEYS = ("index.docker.io", "registry-1.docker.io", "docker.io")


class Credentials(NamedTuple):
    username: str
    password: str


def auth_files() -> list[str]:
    """The credential files in the order they are asked (see the module's doc); missing ones included."""
    home = os.path.expanduser("~")
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")
    docker = os.environ.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    return [login_file(), os.path.join(config_home, "containers", "auth.json"), os.path.join(docker, "config.json")]


def login_file() -> str:
    """Where a login is stored: ``$REGISTRY_AUTH_FILE``, else podman's file under ``$XDG_RUNTIME_DIR``
    (``/run/containers/UID`` without one, as podman does)."""
    if os.environ.get("REGISTRY_AUTH_FILE"):
        return os.environ["REGISTRY_AUTH_FILE"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "containers", "auth.json") if runtime else f"/run/containers/{os.getuid()}/auth.json"


def _key(key: str) -> str:
    """An ``auths`` key as a registry[/namespace]: docker's URL forms cut to the host, Docker Hub's names one."""
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    host, _, path = key.partition("/")
    return "docker.io" + (f"/{path}" if path else "") if host in _HUB_KEYS else key.rstrip("/")


def _read_auths(path: str) -> dict:
    try:
        with open(path) as f:
            document = json.load(f)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        # (none for this user: another user's runtime directory, /run/containers/UID of root's podman, is
        # no error; a registry that wants a login then says so)
        return {}
    except (OSError, ValueError) as e:
        raise LayerfsError(f"{path}: cannot be read as a credentials file ({e})") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    return auths if isinstance(auths, dict) else {}


def find_credentials(registry: str, repository: str = "") -> Credentials | None:
    """The credentials the files hold for ``repository`` on ``registry``; None if none does (anonymous)."""
    parts = repository.split("/") if repository else []
    wanted = [f"{registry}/{'/'.join(parts[:n])}" for n in range(len(parts), 0, -1)] + [registry]
    for path in auth_files():
        entries = {_key(k): v for k, v in _read_auths(path).items()}
        for key in wanted:
            entry = entries.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
                try:
                    username, colon, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    colon = ""
                if not colon:
                    raise LayerfsError(f"{path}: the entry for {printable(key)} is not base64 of user:password")
                return Credentials(username, password)
    return None


def store_login(registry: str, credentials: Credentials, path: str | None = None) -> str:
    """Keep ``credentials`` for ``registry`` in ``path`` (``login_file()`` if None), readable by the user
    alone, beside the entries it has; returns the file written."""
    path = path or login_file()
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        with open(path) as f:
            document = json.load(f)
    except FileNotFoundError:
        document = {}
    except (OSError, ValueError) as e:
        raise LayerfsError(f"{path}: cannot be read as a credentials file ({e})") from None
    if not isinstance(document, dict) or not isinstance(document.setdefault("auths", {}), dict):
        raise LayerfsError(f"{path}: not a credentials file (no auths object)")
    secret = base64.b64encode(f"{credentials.username}:{credentials.password}".encode()).decode()
    document["auths"][registry] = {"auth": secret}
    _write(path, document)
    return path


def _write(path: str, document: dict) -> None:
    """``document`` as the file ``path``, readable by the user alone, replaced in one step."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".auth-")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """A ``WWW-Authenticate`` header's scheme (lowercased) and parameters:
    ``Bearer realm="https://auth.example/token",service="registry",scope="repository:x:pull"``."""
    scheme, _, rest = header.strip().partition(" ")
    params = {}
    for match in _PARAM.finditer(rest):
        quoted, bare = match.group(2), match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
    return scheme.lower(), params


class Authenticator:
    """The ``Authorization`` header for each scope (``repository:NAME:pull,push``, several apart by spaces),
    learnt from the registry's challenges: a basic one for every scope, or a bearer token per scope."""

    def __init__(
        self,
        registry: str,
        credentials: Credentials | None,
        session: requests.Session,
        timeout: float,
        tls_verify: bool,
    ) -> None:
        self.registry, self.credentials, self._session, self._timeout = registry, credentials, session, timeout
        self._verify = tls_verify  # given with each request: a session's own is overridden by REQUESTS_CA_BUNDLE
        self._basic: str | None = None
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def header(self, scope: str) -> dict[str, str]:
        with self._lock:
            if self._basic:
                return {"Authorization": self._basic}
            token = self._tokens.get(scope)
            return {"Authorization": f"Bearer {token}"} if token else {}

    def answer(self, challenge: str, scope: str) -> None:
        """Learn from a 401's ``WWW-Authenticate``; a LayerfsError if nothing we have can answer it."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                raise LayerfsError(f"{self.registry}: needs a login (layerfs login {self.registry})")
            secret = base64.b64encode(f"{self.credentials.username}:{self.credentials.password}".encode())
            with self._lock:
                self._basic = f"Basic {secret.decode()}"
        elif scheme == "bearer" and params.get("realm"):
            token = self._fetch_token(params, scope)
            with self._lock:
                self._tokens[scope] = token
        else:
            raise LayerfsError(f"{self.registry}: cannot answer its challenge {printable(challenge)!r}")

    def _fetch_token(self, params: dict[str, str], scope: str) -> str:
        realm = params["realm"]
        if not realm.startswith(("https://", "http://")):
            raise LayerfsError(f"{self.registry}: its token realm {printable(realm)!r} is not an http(s) URL")
        # Ours first: the challenge's may name less (a pull scope when we push, or none at all).
        scopes = scope.split() + [s for s in params.get("scope", "").split() if s not in scope.split()]
        query = {"scope": scopes, **({"service": params["service"]} if "service" in params else {})}
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        try:
            response = self._session.get(realm, params=query, auth=auth, timeout=self._timeout, verify=self._verify)
        except requests.RequestException as e:
            raise LayerfsError(f"{self.registry}: its token server {printable(realm)} failed: {e}") from None
        if response.status_code in (401, 403):
            raise LayerfsError(
                f"{self.registry}: the token server refused the login" + (f" for {scope}" if scope else "")
            )
        if response.status_code != 200:
            raise LayerfsError(f"{self.registry}: the token server answered HTTP {response.status_code}")
        try:
            document = response.json()
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise LayerfsError(f"{self.registry}: the token server gave no token")
        return token


def forget_login(registry: str, path: str | None = None) -> bool:
    """Remove ``registry``'s entry from ``path`` (``login_file()`` if None); False if it had none."""
    path = path or login_file()
    auths = _read_auths(path)
    if registry not in auths:
        return False
    with open(path) as f:
        document = json.load(f)
    del document["auths"][registry]
    _write(path, document)
    return True

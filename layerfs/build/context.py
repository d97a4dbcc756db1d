"""The build context: a directory, less what its ``.dockerignore`` leaves out, from which COPY and ADD
take their sources (globs, as docker matches them), and the hash of what a step copies that keys the cache.

``.dockerignore`` follows docker's rules: a pattern a line (``#`` comments and blank lines skipped),
relative to the context's root (a leading ``/`` or ``./`` is dropped), ``*`` and ``?`` within one path
component, ``**`` across any number, ``!`` making exceptions; the last pattern matching a path wins, and
a path whose parent directory is excluded is excluded too. The Dockerfile and ``.dockerignore`` are
always sent, as docker sends them.
"""

from __future__ import annotations

import os
import re
import stat

import xxhash

from ..errors import LayerfsError

_MAX_LINKS = 40  # symlinks followed on one path before ELOOP, as the kernel's limit


class Context:
    def __init__(self, root: str, *, ignore_file: bool = True) -> None:
        """``ignore_file``: whether ``.dockerignore`` applies (not to another image's files, for ``--from``)."""
        if not os.path.isdir(root):
            raise LayerfsError(f"{root}: the build context is no directory")
        self.root = os.path.abspath(root)
        self._rules = _read_ignore(os.path.join(self.root, ".dockerignore")) if ignore_file else []

    def ignored(self, path: str) -> bool:
        """Whether ``path`` (relative to the context) is left out by ``.dockerignore``."""
        if path in (".dockerignore", "Dockerfile"):
            return False
        parts = path.split("/")
        return any(self._matches_last("/".join(parts[:n])) for n in range(1, len(parts) + 1))

    def _matches_last(self, path: str) -> bool:
        excluded = False
        for negated, pattern in self._rules:
            if pattern.fullmatch(path):
                excluded = not negated
        return excluded

    def sources(self, pattern: str) -> list[str]:
        """The context's paths (relative, sorted) that the COPY source ``pattern`` names: a glob, or a plain
        path, which may be a symlink to follow inside the context. Empty where nothing matches."""
        clean = os.path.normpath("/" + pattern).lstrip("/") or "."
        if clean == ".":
            return ["."]
        if not any(c in clean for c in "*?["):
            real = resolve_in_root(self.root, clean)
            return [real] if os.path.lexists(os.path.join(self.root, real)) and not self.ignored(real) else []
        regex = _glob_regex(clean)
        found = []
        for parent, dirs, files in os.walk(self.root):
            relative = os.path.relpath(parent, self.root)
            for name in dirs + files:
                path = name if relative == "." else f"{relative}/{name}"
                if regex.fullmatch(path) and not self.ignored(path):
                    found.append(path)
            dirs[:] = [d for d in dirs if _deeper(clean, relative)]
        return sorted(found)

    def tree(self, path: str) -> list[str]:
        """``path`` (relative) and, for a directory, everything below it that is not ignored, parents first."""
        found = [path]
        full = os.path.join(self.root, path)
        if not stat.S_ISDIR(os.lstat(full).st_mode):
            return found
        for parent, dirs, files in os.walk(full):
            relative = os.path.relpath(parent, self.root)
            kept = []
            for name in sorted(dirs) + sorted(files):
                sub = os.path.normpath(f"{relative}/{name}")
                if not self.ignored(sub):
                    found.append(sub)
                    if name in dirs:
                        kept.append(name)
            dirs[:] = kept
        return found

    def hash(self, paths: list[str]) -> str:
        """The hash of what copying ``paths`` (relative) would copy: each entry's name, type, mode, owner,
        size, xattrs, content and link target; not its times, as docker's cache leaves them out."""
        digest = xxhash.xxh3_128()
        for top in paths:
            for path in self.tree(top):
                full = os.path.join(self.root, path)
                st = os.lstat(full)
                digest.update(f"{path}\0{st.st_mode:o}\0{st.st_uid}:{st.st_gid}\0{st.st_size}\0".encode())
                for name in sorted(os.listxattr(full, follow_symlinks=False)):
                    digest.update(name.encode() + b"\0" + os.getxattr(full, name, follow_symlinks=False))
                if stat.S_ISLNK(st.st_mode):
                    digest.update(os.readlink(full).encode("utf-8", "surrogateescape"))
                elif stat.S_ISREG(st.st_mode):
                    with open(full, "rb") as f:
                        while chunk := f.read(1 << 20):
                            digest.update(chunk)
        return digest.hexdigest()


def _deeper(pattern: str, relative: str) -> bool:
    """Whether a glob's walk goes below directory ``relative``: only as deep as the glob reaches."""
    depth = 0 if relative == "." else relative.count("/") + 1
    return "**" in pattern or depth + 1 < pattern.count("/") + 1


def resolve_in_root(root: str, path: str) -> str:
    """``path`` (relative to ``root``) with its symlinks followed as if ``root`` were ``/`` (an absolute
    target starts again at ``root``, ``..`` stops there), so nothing leads out of it; relative, "." for
    the root itself. The last component is followed too."""
    done: list[str] = []
    todo = [p for p in path.split("/") if p not in ("", ".")]
    links = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, name)
        if os.path.islink(here):
            links += 1
            if links > _MAX_LINKS:
                raise LayerfsError(f"{path}: too many levels of symbolic links")
            target = os.readlink(here)
            if target.startswith("/"):
                done = []
            todo = [p for p in target.split("/") if p not in ("", ".")] + todo
            continue
        done.append(name)
    return "/".join(done) or "."


def _read_ignore(path: str) -> list[tuple[bool, re.Pattern[str]]]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    rules = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath("/" + line.removeprefix("!").strip()).lstrip("/")
        if pattern:
            rules.append((negated, _glob_regex(pattern)))
    return rules


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match for a relative path, with docker's ``**`` (any number of components)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : end]
                out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
                i = end
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))

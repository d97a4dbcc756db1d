"""Which command an argument list asks for: a command word, or fuse-overlayfs's calling form.

containers-storage runs a ``mount_program`` as fuse-overlayfs is run, with no command word:
``layerfs [-f] [-d] -o OPTIONS MOUNTPOINT``. That form is taken only when the arguments are exactly
that (mount options and one mount point); a first word that is no command is an unknown command, never
a mount, so that a typo cannot mount anything anywhere.

mount.fuse3 runs a ``fuse3.layerfs`` mount (containerd's, fstab's) as ``layerfs SOURCE TARGET -o OPTIONS``:
that form is taken when SOURCE is ``layerfs``.

A run builds the parser of its own command only (``Commands``).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError

_OWN_OPTIONS = ("-h", "--help", "--version")
HELPER_SOURCE = "layerfs"  # the source of a fuse3.layerfs mount (kernel overlayfs's is "overlay")


def _words(argv: list[str]) -> tuple[list[str], int]:
    """The positional words of ``argv`` (an ``-o``'s value is none) and how many ``-o`` it has."""
    words, options = [], 0
    arguments = iter(argv)
    for argument in arguments:
        if argument == "-o":
            next(arguments, None)
        if argument.startswith("-o"):
            options += 1
        elif not argument.startswith("-"):
            words.append(argument)
    return words, options


def command_line(argv: list[str], commands: tuple[str, ...]) -> list[str]:
    """``argv`` with its command word first; UsageError for a word that is no command."""
    if not argv or argv[0] in commands or argv[0] in _OWN_OPTIONS:
        return argv
    words, options = _words(argv)
    # mount.fuse3's form, as containerd's fuse3.layerfs mounts run it: a source named layerfs first
    if options and len(words) == 2 and argv[0] == HELPER_SOURCE:
        return ["mount", *argv[1:]]
    # The mount form: -o and one mount point. Options first but more words is that form given wrong,
    # and the mount command says what is wrong (with -o given, it mounts no container of the store).
    if options and (len(words) <= 1 or argv[0].startswith("-")):
        return ["mount", *argv]
    if not words:
        return argv  # options alone: argparse says what it makes of them
    import difflib

    nearest = difflib.get_close_matches(words[0], commands, n=1)
    hint = f"did you mean {nearest[0]}?" if nearest else "layerfs --help lists them"
    raise UsageError(f"{words[0]}: unknown command ({hint})")


class _Unbuilt:
    """The parser of a command this run does not run: whatever is asked of it is ignored."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: self


class Commands:
    """``layerfs``'s subparsers as far as one run needs them: only the command it names (building all
    forty parsers would take longer than a cached build's own work), or every one when it names none
    (for the help and the errors that list them)."""

    def __init__(self, sub: argparse._SubParsersAction, wanted: str | None) -> None:
        self._sub = sub
        self._wanted = wanted

    def add_parser(self, name: str, **kwargs: Any) -> Any:  # (an ArgumentParser, or one that ignores all)
        if self._wanted in (None, name):
            return self._sub.add_parser(name, **kwargs)
        return _Unbuilt()

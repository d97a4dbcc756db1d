"""Errors meant for a person: printed as one line, ``layerfs: <message>``, details only under --debug."""


def log_to_stderr(*, debug: bool = False) -> None:
    """The process's warnings (with ``debug``, everything) to stderr as ``layerfs: <message>`` lines, as its
    errors go. Called by what logs (a daemon, the snapshotter) and by --debug; a set-up made already stays."""
    import logging  # (here: a command that logs nothing loads no logging)

    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="layerfs: %(message)s")


def printable(text: str) -> str:
    """``text`` fit for a one-line message: bytes that are not UTF-8 and control characters escaped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class LayerfsError(Exception):
    """A failure the user can act on; its message is the whole story."""


class UsageError(LayerfsError):
    """Wrong options or arguments; nothing was done."""

"""Errors meant for a person: printed as one line, ``layerfs: <message>``, details only under --debug."""


def printable(text: str) -> str:
    """``text`` fit for a one-line message: bytes that are not UTF-8 and control characters escaped."""
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class LayerfsError(Exception):
    """A failure the user can act on; its message is the whole story."""


class UsageError(LayerfsError):
    """Wrong options or arguments; nothing was done."""

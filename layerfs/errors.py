"""Errors meant for a person: printed as one line, ``layerfs: <message>``, details only under --debug."""


class LayerfsError(Exception):
    """A failure the user can act on; its message is the whole story."""


class UsageError(LayerfsError):
    """Wrong options or arguments; nothing was done."""

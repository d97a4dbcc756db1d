"""layerfs: a layered copy-on-write filesystem for container root filesystems."""

__version__ = "0.1.0"

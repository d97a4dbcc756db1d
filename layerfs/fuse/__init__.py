"""The kernel's FUSE protocol, spoken on /dev/fuse without libfuse. It knows nothing of layers."""

from .operations import Entry, Opened, Operations, Request, SetAttr, pack_attr
from .session import Config, Session, Stats

__all__ = ["Config", "Entry", "Opened", "Operations", "Request", "Session", "SetAttr", "Stats", "pack_attr"]

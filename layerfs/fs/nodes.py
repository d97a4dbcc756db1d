"""The kernel's node ids for the union's files: one per file, so hard links share one, as on a real fs.

The kernel names a file by a node id it got from a lookup; the union names it by a merged-view path.
A node keeps the name it was found by (its parent node and a name), so its path follows renames of any
directory above it for free, and the other names of a hard-linked file it was found by.

A node is found again by its *key*: the merged inode number, which the union keeps across copy-up. The
exception is a lower file with several hard links: overlayfs (without ``index``) breaks the link on
copy-up, so each of its names is a file of its own and gets a node keyed by that name. A node whose file
lost its last name is *retired*: it lives on for the kernel's open files and references, but no lookup
finds it, so a new file that the filesystem gives the same inode number gets a node of its own.

A node's path is only right while no rename or removal is half done: between the union's change and the
table's, a path computed for a node below a moved directory names what is at its old place now, or
nothing. ``NameLock`` keeps the two in step (as libfuse's high-level API does with its tree lock).
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Hashable

ROOT_ID = 1


class NameLock:
    """Requests that name files by path share it; one that moves or removes names (the union's change
    and the node table's) holds it alone, and goes first: new sharers wait while it waits. Taking it
    shared costs two acquisitions of a plain lock when no change is pending: every request takes it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sharers = 0
        self._changing = False
        self._waiting = 0

    def acquire_shared(self) -> None:
        with self._lock:
            while self._changing or self._waiting:
                self._cond.wait()
            self._sharers += 1

    def release_shared(self) -> None:
        with self._lock:
            self._sharers -= 1
            if not self._sharers and self._waiting:
                self._cond.notify_all()

    def acquire(self) -> None:
        with self._lock:
            self._waiting += 1
            while self._changing or self._sharers:
                self._cond.wait()
            self._waiting -= 1
            self._changing = True

    def release(self) -> None:
        with self._lock:
            self._changing = False
            self._cond.notify_all()


class Node:
    __slots__ = (
        "nodeid",
        "key",
        "parent",
        "name",
        "aliases",
        "lookups",
        "io_key",
        "io_count",
        "passing",
        "backing",
        "backing_writable",
        "pages_stale",
        "keeper",
        "known_path",
    )

    def __init__(self, nodeid: int, key: Hashable, parent: Node | None, name: str) -> None:
        self.nodeid = nodeid
        self.key = key
        self.parent = parent
        self.name = name
        self.aliases: tuple[tuple[Node, str], ...] = ()  # more names of a hard-linked file (rare: a tuple)
        self.lookups = 0
        # Open files: which real file they hold ((dev, ino)), how many, and whether they pass through
        # (else they are served through the daemon): the kernel wants every open of one node alike.
        self.io_key: tuple[int, int] | None = None
        self.io_count = 0
        self.passing = False
        # The passthrough backing id registered for io_key's file (0: none), kept between opens until
        # the kernel forgets the node, and whether it was registered for writing.
        self.backing = 0
        self.backing_writable = False
        # Written through a backing since the kernel may have cached its pages (opens not passed through).
        self.pages_stale = False
        # An O_PATH descriptor of a file that lost its last name while the kernel still knew the node:
        # an open that looked the name up just before the unlink reaches the file through it, as on a
        # local filesystem (-1: none).
        self.keeper = -1
        # Its path when the table had made ``moves`` changes of names: valid while it still has.
        self.known_path: tuple[int, str] | None = None

    @property
    def named(self) -> bool:
        return self.parent is not None or self.nodeid == ROOT_ID


def _renumbered(old: Hashable, new: Hashable) -> bool:
    """Whether ``new`` is the number key of the same kind of file that ``old``, a name key
    ((parent, name, type)), stood for: a lower file with several links that was copied up."""
    return isinstance(old, tuple) and isinstance(new, int) and new & 0xF == old[2]


def _missing(nodeid: int) -> OSError:
    return OSError(errno.ESTALE, f"node {nodeid} is not known")


class Nodes:
    def __init__(self, root_key: Hashable) -> None:
        self._lock = threading.Lock()
        self._numbers = itertools.count(ROOT_ID + 1)
        root = Node(ROOT_ID, root_key, None, "")
        root.lookups = 1  # the kernel never forgets the root
        self._by_id: dict[int, Node] = {ROOT_ID: root}
        self._by_key: dict[Hashable, Node] = {root_key: root}
        self._by_name: dict[tuple[int, str], Node] = {}
        self._moves = 0  # changes of any node's name so far: a path known before one may be stale

    def __getitem__(self, nodeid: int) -> Node:
        node = self._by_id.get(nodeid)
        if node is None:
            raise _missing(nodeid)
        return node

    def __len__(self) -> int:
        return len(self._by_id)

    def path(self, node: Node) -> str:
        """The merged-view path of ``node``; ENOENT for a file with no name left."""
        known = node.known_path
        moves = self._moves  # (read before the walk: a name changed during it makes the result unkept)
        if known is not None and known[0] == moves:
            return known[1]
        if node.nodeid == ROOT_ID:
            return "/"
        parts = []
        walked = node
        while walked.nodeid != ROOT_ID:
            if walked.parent is None:
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), "(a file with no name left)")
            parts.append(walked.name)
            walked = walked.parent
        path = "/" + "/".join(reversed(parts))
        node.known_path = (moves, path)
        return path

    def child_path(self, parent: Node, name: str) -> str:
        base = self.path(parent)
        return base + name if base == "/" else f"{base}/{name}"

    def found(self, parent: Node, name: str, key: Hashable) -> Node:
        """``name`` in ``parent`` is the file ``key``: its node, with one more kernel reference."""
        with self._lock:
            node = self._by_name.get((parent.nodeid, name))
            if node is not None and node.key != key:
                if _renumbered(node.key, key) and node.io_count == 0 and key not in self._by_key:
                    self._rekey(node, key)  # a lower file with several links, copied up: a number of its own
                else:
                    self._drop_name(node, parent, name)
                    node = None
            if node is None:
                node = self._by_key.get(key)
                if node is None:
                    node = Node(next(self._numbers), key, parent, name)
                    self._by_id[node.nodeid] = node
                    self._by_key[key] = node
                else:
                    self._add_name(node, parent, name)
                self._by_name[(parent.nodeid, name)] = node
            node.lookups += 1
            return node

    def child(self, parent: Node, name: str) -> Node | None:
        return self._by_name.get((parent.nodeid, name))

    def below(self, top: Node) -> list[Node]:
        """The nodes inside the directory ``top``, at any depth (a walk of every node: for rare events)."""
        with self._lock:
            nodes = list(self._by_id.values())
        found = []
        for node in nodes:
            parent = node.parent
            while parent is not None and parent is not top:
                parent = parent.parent
            if parent is top:
                found.append(node)
        return found

    def rekey(self, node: Node, key: Hashable) -> None:
        with self._lock:
            if node.key != key and key not in self._by_key:
                self._rekey(node, key)

    def _rekey(self, node: Node, key: Hashable) -> None:
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]
        node.key = key
        self._by_key[key] = node

    def forget(self, nodeid: int, count: int) -> Node | None:
        """Drop ``count`` kernel references; returns the node if that was its last."""
        with self._lock:
            node = self._by_id.get(nodeid)
            if node is None or nodeid == ROOT_ID:
                return None
            node.lookups -= count
            if node.lookups <= 0:
                del self._by_id[nodeid]
                if self._by_key.get(node.key) is node:
                    del self._by_key[node.key]
                for parent, name in [(node.parent, node.name), *node.aliases]:
                    if parent is not None and self._by_name.get((parent.nodeid, name)) is node:
                        del self._by_name[(parent.nodeid, name)]
                return node
            return None

    def removed(self, parent: Node, name: str, *, last: bool) -> None:
        """``name`` in ``parent`` is gone; ``last``: its file has no other name left, here or unseen."""
        with self._lock:
            node = self._by_name.pop((parent.nodeid, name), None)
            if node is None:
                return
            self._drop_name(node, parent, name)
            if last:
                self._retire(node)

    def renamed(self, parent: Node, name: str, newparent: Node, newname: str, *, replaced_last: bool) -> None:
        """``name`` in ``parent`` is now ``newname`` in ``newparent`` (replacing what was there)."""
        self.removed(newparent, newname, last=replaced_last)
        with self._lock:
            node = self._by_name.pop((parent.nodeid, name), None)
            if node is None:
                return
            self._drop_name(node, parent, name)
            self._add_name(node, newparent, newname)
            self._by_name[(newparent.nodeid, newname)] = node

    def exchanged(self, parent: Node, name: str, newparent: Node, newname: str) -> None:
        with self._lock:
            a = self._by_name.pop((parent.nodeid, name), None)
            b = self._by_name.pop((newparent.nodeid, newname), None)
            for node, old in ((a, (parent, name)), (b, (newparent, newname))):
                if node is not None:
                    self._drop_name(node, *old)
            for node, new in ((a, (newparent, newname)), (b, (parent, name))):
                if node is not None:
                    self._add_name(node, *new)
                    self._by_name[(new[0].nodeid, new[1])] = node

    def retire(self, node: Node) -> None:
        """No lookup finds ``node`` again (the file behind its names changed under open files)."""
        with self._lock:
            for parent, name in [(node.parent, node.name), *node.aliases]:
                if parent is not None and self._by_name.get((parent.nodeid, name)) is node:
                    del self._by_name[(parent.nodeid, name)]
            self._retire(node)

    def _retire(self, node: Node) -> None:
        if self._by_key.get(node.key) is node:
            del self._by_key[node.key]

    # Every change of a node's names goes through these two, which count it (after it: see ``path``).

    def _add_name(self, node: Node, parent: Node, name: str) -> None:
        if node.parent is None:
            node.parent, node.name = parent, name
        elif (node.parent, node.name) != (parent, name) and (parent, name) not in node.aliases:
            node.aliases += ((parent, name),)
        self._moves += 1

    def _drop_name(self, node: Node, parent: Node, name: str) -> None:
        if (node.parent, node.name) == (parent, name):
            node.parent, node.name = node.aliases[-1] if node.aliases else (None, "")
            node.aliases = node.aliases[:-1]
        elif (parent, name) in node.aliases:
            node.aliases = tuple(alias for alias in node.aliases if alias != (parent, name))
        self._moves += 1

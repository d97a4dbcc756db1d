"""The build cache, by docker's rules: a step's result is reused when its parent (the image state it runs
on), its instruction (variables substituted, with the build args in effect for RUN) and, for COPY and ADD,
the hash of the content and metadata it copies are the same as a step built before.

``STORE/build-cache.json`` maps each step's key to the state it made: an image config (its id is the
config's digest, as docker's image ids are) and its layers' blobs. A state whose layers or blobs a ``gc``
removed (no image keeps them) is no longer found, and its step runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple

from ..store import Store
from ..store.manifests import dump, now

HISTORY_COMMENT = "buildkit.dockerfile.v0"  # as BuildKit marks the history entries of a Dockerfile's steps

_FILE = "build-cache.json"


class State(NamedTuple):
    """An image as a build has it between steps."""

    config: dict  # the whole image config: architecture, os, config, rootfs, history
    blobs: list[str]  # its layers' blobs, bottom first, beside config["rootfs"]["diff_ids"]
    manifest_type: str
    base: str | None = None  # the store image it is, unchanged (a FROM's)

    @property
    def id(self) -> str:
        return "sha256:" + hashlib.sha256(dump(self.config)).hexdigest()

    @property
    def layers(self) -> list[str]:
        return list(self.config.get("rootfs", {}).get("diff_ids") or [])

    def after(self, config: dict, created_by: str, *, empty: bool = False) -> State:
        """The state a step made of this one: ``config`` (this one's, changed by the step; its layers
        those of this state and, unless ``empty``, one more) with the step's history entry, made now."""
        created = now()
        config["created"] = created
        entry: dict[str, object] = {"created": created, "created_by": created_by, "comment": HISTORY_COMMENT}
        if empty:
            entry["empty_layer"] = True
        config["history"] = [*(config.get("history") or []), entry]
        return State(config, list(self.blobs), self.manifest_type)


def key(parent: State, text: str, extra: object = None) -> str:
    return hashlib.sha256(json.dumps([parent.id, text, extra]).encode()).hexdigest()


class Cache:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.root.sub(_FILE)

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {"steps": {}, "states": {}}

    def find(self, step: str) -> State | None:
        """The state step ``step`` made before, if the store still has all of it."""
        cached = self._read()
        state_id = cached["steps"].get(step)
        found = cached["states"].get(state_id) if state_id else None
        if found is None:
            return None
        state = State(found["config"], found["blobs"], found["manifest_type"])
        if not all(self.store.layers.has(d) for d in state.layers) or not all(
            self.store.blobs.has(b) for b in state.blobs
        ):
            return None
        return state

    def add(self, step: str, state: State) -> None:
        with self.store.root.locked():
            cached = self._read()
            cached["steps"][step] = state.id
            cached["states"][state.id] = {
                "config": state.config,
                "blobs": state.blobs,
                "manifest_type": state.manifest_type,
            }
            with open(self.path + ".tmp", "w") as f:
                json.dump(cached, f)
            os.replace(self.path + ".tmp", self.path)

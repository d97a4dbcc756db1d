"""``layerfs build``: a Dockerfile's stages built into images of the store, a step at a time.

Each stage starts from its FROM (a store image, pulled when missing; ``scratch``; an earlier stage) and
goes through its instructions. A step that changes only the config makes a new config with a history
entry marked ``empty_layer``. RUN runs in a container of the step's parent (a layerfs mount of its layers
with an empty upper, the process as ``layerfs run`` would start it, without a network); COPY and ADD put
files into such a container's mount. Either one's changes, read from the mount's change index, are
committed as one layer (none where nothing changed). Every step is looked up in the cache first
(``cache``), and kept there once built. The stage asked for (``--target``, else the last) becomes the
image, named by each ``-t``.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, NamedTuple, TextIO

from ..errors import LayerfsError
from ..runtime import DEFAULT_PATH
from ..store import Store
from ..store.manifests import OCI_MANIFEST
from . import dockerfile, steps
from .cache import Cache, State, key
from .context import Context, resolve_in_root
from .dockerfile import Instruction, Stage

if TYPE_CHECKING:  # (what only a step built anew needs is imported there: a cached build loads none of it)
    from .copying import Copy

_COPY_FLAGS = ("from", "chown", "chmod", "link")  # (--link: layers are independent here anyway)


class Options(NamedTuple):  # (no dataclasses on a cached build's path: their import costs more than its work)
    context: str
    dockerfile: str | None = None  # default: CONTEXT/Dockerfile
    tags: Sequence[str] = ()
    build_args: Mapping[str, str] = MappingProxyType({})
    target: str | None = None
    no_cache: bool = False
    platform: str | None = None
    network: bool = False


class _Stage:
    """A stage while it is built: its state, and what its instructions have set so far."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.args: dict[str, str] = {}  # the ARGs in effect
        self.cmd_set = False


class Builder:
    """One build of a Dockerfile into the store, its steps' lines written to ``out``."""

    def __init__(self, store: Store, opts: Options, out: TextIO = sys.stdout) -> None:
        self.store = store
        self.opts = opts
        self.out = out
        self.cache = Cache(store)
        self.context = Context(opts.context)
        self._line = self._step_number = self._steps_total = 0

    def build(self) -> str:
        """Build, name the image by each tag; returns its id (its config's digest)."""
        path = self.opts.dockerfile or os.path.join(self.context.root, "Dockerfile")
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise LayerfsError(f"{path}: {e.strerror}") from None
        parsed = dockerfile.parse(text, os.path.basename(path))
        chosen = self._stages_to_build(parsed)
        self._steps_total = sum(1 + sum(i.keyword != "ARG" for i in s.instructions) for s in chosen)
        globals_ = self._global_args(parsed.global_args)
        built: dict[int, State] = {}
        names: dict[str, int] = {}
        for stage in chosen:
            built[stage.number] = self._stage(stage, globals_, built, names)
            if stage.name:
                names[stage.name] = stage.number
        final = built[chosen[-1].number]
        started = time.monotonic()
        self._announce("exporting to image", counted=False)
        image_id = final.id if final.base is None else self.store.images.record(final.base)["config_digest"]
        self._say(f"writing image {image_id} done")
        for tag in self.opts.tags:
            if final.base is not None:
                name = self.store.tag(final.base, tag)
            else:
                name = self.store.images.key(tag)
                if (self.store.images.find(name) or {}).get("config_digest") != image_id:  # (else named so already)
                    self.store.add_built(tag, final.config, final.blobs, final.manifest_type)
            self._say(f"naming to {name} done")
        self._say(f"DONE {time.monotonic() - started:.1f}s")
        return image_id

    def _stages_to_build(self, parsed: dockerfile.Dockerfile) -> list[Stage]:
        """The target stage and the earlier ones it needs (by FROM or COPY --from), in order."""
        stages = parsed.stages
        by_name = {s.name: s for s in stages if s.name}
        if self.opts.target is None:
            target = stages[-1]
        elif self.opts.target.lower() in by_name:
            target = by_name[self.opts.target.lower()]
        else:
            raise LayerfsError(f"--target {self.opts.target}: no stage of that name")
        needed = {target.number}
        for stage in reversed(stages[: target.number + 1]):
            if stage.number not in needed:
                continue
            refs = [stage.base] + [
                dockerfile.flags(i, _COPY_FLAGS)[0].get("from", "")
                for i in stage.instructions
                if i.keyword in ("COPY", "ADD")
            ]
            for ref in refs:
                earlier = by_name.get(ref.lower()) or (stages[int(ref)] if ref.isdigit() else None)
                if earlier is not None and earlier.number < stage.number:
                    needed.add(earlier.number)
        return [s for s in stages if s.number in needed]

    def _global_args(self, instructions: list[Instruction]) -> dict[str, str]:
        found: dict[str, str] = {}
        for instruction in instructions:
            for name, default in self._arg_words(instruction, found):
                if name in self.opts.build_args:
                    found[name] = self.opts.build_args[name]
                elif default is not None:
                    found[name] = default
        return found

    def _arg_words(self, instruction: Instruction, variables: dict[str, str]) -> list[tuple[str, str | None]]:
        """ARG's ``NAME`` and ``NAME=default`` words (default substituted)."""
        found: list[tuple[str, str | None]] = []
        for word in dockerfile.words(instruction.value):
            name, equals, default = word.partition("=")
            if not name:
                raise instruction.error(f"{word}: no name")
            found.append((name, dockerfile.substitute(default, variables) if equals else None))
        return found

    def _stage(self, stage: Stage, globals_: dict[str, str], built: dict[int, State], names: dict[str, int]) -> State:
        base = dockerfile.substitute(stage.base, globals_)
        self._announce(f"FROM {base}{' AS ' + stage.name if stage.name else ''}")
        started = time.monotonic()
        current = _Stage(self._from(base, stage.from_line, built, names))
        self._say(f"DONE {time.monotonic() - started:.1f}s")
        for instruction in stage.instructions:
            if instruction.keyword == "ARG":
                variables = {**current.args, **steps.env_of(self._config(current))}
                for name, default in self._arg_words(instruction, variables):
                    value = self.opts.build_args.get(name, default if default is not None else globals_.get(name))
                    if value is not None:
                        current.args[name] = value
                continue
            current.state = self._step(instruction, current, built, names)
            if instruction.keyword == "CMD":
                current.cmd_set = True
        return current.state

    def _from(self, base: str, line: Instruction, built: dict[int, State], names: dict[str, int]) -> State:
        """The state a FROM (or a COPY --from) starts from: an earlier stage, scratch, or a store image
        (pulled when the store lacks it)."""
        if base.lower() in names:
            state = built[names[base.lower()]]
        elif base == "scratch":
            state = State(_scratch_config(self.opts.platform), [], OCI_MANIFEST)
        else:
            record = self.store.images.find(base)
            if record is None:
                try:
                    self.out.flush()
                    base, record = self.store.pull(base, platform=self.opts.platform)
                except LayerfsError as e:
                    raise line.error(f"{base}: {e}") from None
            state = State(
                copy.deepcopy(record["config"]),
                list(record.get("blobs") or []),
                record.get("manifest_type") or OCI_MANIFEST,
                base=self.store.images.key(base),
            )
        return _with_path(state)

    @staticmethod
    def _config(stage: _Stage) -> dict:
        return stage.state.config.get("config") or {}

    def _step(self, instruction: Instruction, stage: _Stage, built: dict[int, State], names: dict[str, int]) -> State:
        config = self._config(stage)
        variables = {**stage.args, **steps.env_of(config)}
        keyword = instruction.keyword
        extra: object
        self._announce(f"{keyword} {instruction.value}")
        if keyword == "WORKDIR":
            text, extra = f"WORKDIR {dockerfile.substitute(instruction.value, variables)}", None
            make = lambda: self._workdir(instruction, stage, variables)  # noqa: E731
        elif keyword in steps.CONFIG_ONLY:
            text, extra = f"{keyword} {dockerfile.substitute(instruction.value, variables)}", stage.cmd_set
            make = lambda: self._configured(instruction, stage, variables)  # noqa: E731
        elif keyword == "RUN":
            argv = steps.command(instruction.value, config)
            text, extra = f"RUN {argv}", sorted(stage.args.items())
            make = lambda: self._run(instruction, stage, argv)  # noqa: E731
        else:
            copying = self._copying(instruction, stage, variables, built, names)
            text, extra = f"{keyword} {copying.describe()}", copying.hash()
            make = lambda: self._copy(instruction, stage, copying)  # noqa: E731
        step = key(stage.state, text, extra)
        if not self.opts.no_cache:
            found = self.cache.find(step)
            if found is not None:
                self._say("CACHED")
                return found
        started = time.monotonic()
        try:
            made = make()
        except OSError as e:
            raise instruction.error(f"{e.filename}: {e.strerror}" if e.filename else str(e)) from None
        self.cache.add(step, made)
        self._say(f"DONE {time.monotonic() - started:.1f}s")
        return made

    def _configured(self, instruction: Instruction, stage: _Stage, variables: dict[str, str]) -> State:
        config = copy.deepcopy(stage.state.config)
        steps.configure(instruction, config.setdefault("config", {}), variables, stage.cmd_set)
        if instruction.keyword == "MAINTAINER":
            config["author"] = instruction.value
        return stage.state.after(config, steps.history_text(instruction), empty=True)

    def _workdir(self, instruction: Instruction, stage: _Stage, variables: dict[str, str]) -> State:
        """WORKDIR's config, and the directory made (as root, 0755) where the image lacks it, as docker makes it."""
        from . import stepcontainer
        from .copying import Copy

        config = copy.deepcopy(stage.state.config)
        steps.configure(instruction, config.setdefault("config", {}), variables, stage.cmd_set)
        with stepcontainer.mounted(self.store, stage.state) as box:
            Copy(box.merged, None, None).make_dirs(config["config"]["WorkingDir"])
            changed = State(config, stage.state.blobs, stage.state.manifest_type)
            return stepcontainer.committed(self.store, changed, box, steps.history_text(instruction))

    def _run(self, instruction: Instruction, stage: _Stage, argv: list[str]) -> State:
        from ..runtime import shim
        from ..runtime.confinement import Confinement
        from . import stepcontainer

        config = self._config(stage)
        process = shim.Process(
            argv,
            {"PATH": DEFAULT_PATH, **stage.args, **steps.env_of(config)},
            config.get("WorkingDir") or "/",
            config.get("User") or "",
            stepcontainer.HOSTNAME,
            network=self.opts.network,
            confinement=Confinement(),
        )
        with stepcontainer.mounted(self.store, stage.state) as box:
            self.out.flush()
            code = box.run(process)
            if code != 0:
                raise instruction.error(f"{' '.join(argv)}: exit code {code}")
            history = steps.history_text(instruction, argv, stage.args)
            return stepcontainer.committed(self.store, stage.state, box, history)

    def _copying(
        self,
        instruction: Instruction,
        stage: _Stage,
        variables: dict[str, str],
        built: dict[int, State],
        names: dict[str, int],
    ) -> _Copying:
        found, rest = dockerfile.flags(instruction, _COPY_FLAGS)
        listed = dockerfile.json_form(rest)
        items = (
            [dockerfile.substitute(w, variables) for w in listed]
            if listed is not None
            else dockerfile.words(rest, variables)
        )
        if len(items) < 2:
            raise instruction.error("needs a source and a destination")
        workdir = self._config(stage).get("WorkingDir") or "/"
        written = items[-1]
        as_dir = written.endswith("/") or written in (".", "..") or written.endswith(("/.", "/.."))
        dest = os.path.normpath(os.path.join(workdir, written)) + ("/" if as_dir else "")
        source: State | None = None
        origin = found.get("from")
        if origin is not None:
            if origin.lower() in names:
                source = built[names[origin.lower()]]
            elif origin.isdigit() and int(origin) in built:
                source = built[int(origin)]
            else:
                source = self._from(origin, instruction, built, names)
        mode = None
        if "chmod" in found:
            try:
                mode = int(found["chmod"], 8)
            except ValueError:
                raise instruction.error(f"--chmod={found['chmod']}: not an octal mode") from None
        return _Copying(self, instruction, items[:-1], dest, source, found.get("chown"), mode)

    def _copy(self, instruction: Instruction, stage: _Stage, copying: _Copying) -> State:
        from . import stepcontainer

        with stepcontainer.mounted(self.store, stage.state) as box:
            copying.into(box.merged)
            return stepcontainer.committed(self.store, stage.state, box, steps.history_text(instruction))

    def _announce(self, what: str, *, counted: bool = True) -> None:
        """A step's first line, as BuildKit's plain output: ``#3 [3/9] COPY app.py /app/``."""
        self._line += 1
        if counted:
            self._step_number += 1
            what = f"[{self._step_number}/{self._steps_total}] {what}"
        self._say(what)

    def _say(self, what: str) -> None:
        print(f"#{self._line} {what}", file=self.out, flush=True)


class _Copying:
    """What a COPY or ADD copies, found before it runs: its sources, their hash, where they go."""

    def __init__(
        self,
        builder: Builder,
        instruction: Instruction,
        patterns: list[str],
        dest: str,
        source: State | None,
        chown: str | None,
        mode: int | None,
    ) -> None:
        self.builder, self.instruction = builder, instruction
        self.patterns, self.dest, self.source = patterns, dest, source
        self.chown, self.mode = chown, mode
        if len(patterns) > 1 and not dest.endswith("/"):
            raise instruction.error("with more than one source, the destination must be a directory ending in /")
        if source is None:
            self.paths = [self._matched(builder.context, p) for p in patterns]

    def _matched(self, context: Context, pattern: str) -> list[str]:
        if "://" in pattern:
            raise self.instruction.error(f"{pattern}: URLs are not supported")
        found = context.sources(pattern)
        if not found:
            where = "in the context" if self.source is None else "in the source image"
            raise self.instruction.error(f"{pattern}: no such file {where}")
        return found

    def describe(self) -> str:
        """The step as the cache keys it (with ``hash``): sources, destination, owner, mode, source image."""
        return repr((self.patterns, self.dest, self.chown, self.mode, self.source.id if self.source else None))

    def hash(self) -> str | None:
        """The content and metadata of what the context gives (a source image is named by its id already)."""
        if self.source is not None:
            return None
        return self.builder.context.hash([p for paths in self.paths for p in paths])

    def into(self, merged: str) -> None:
        if self.source is None:
            self._copy(merged, self.builder.context, self.paths, (0, 0))
            return
        from . import stepcontainer

        with stepcontainer.mounted(self.builder.store, self.source) as box:
            context = Context(box.merged, ignore_file=False)
            self._copy(merged, context, [self._matched(context, p) for p in self.patterns], None)

    def _copy(self, merged: str, context: Context, paths: list[list[str]], owner: tuple[int, int] | None) -> None:
        from ..tarfilters import tarfile
        from .copying import Copy

        if self.chown:
            owner = _owner(merged, self.chown, self.instruction)
        copier = Copy(merged, owner, self.mode)
        flat = [p for found in paths for p in found]
        into_dir = self.dest.endswith("/") or len(flat) > 1 or copier.is_dir(self.dest)
        for path in flat:
            try:
                self._copy_one(copier, context, path, into_dir)
            except OSError as e:  # (named as the container sees it, not by the mount's path on the host)
                raise self.instruction.error(f"{path}: {e.strerror}") from None
            except tarfile.FilterError as e:  # (its own message names the mount's path)
                raise self.instruction.error(f"{path}: {e.tarinfo.name}: reaches outside {self.dest}") from None

    def _copy_one(self, copier: Copy, context: Context, path: str, into_dir: bool) -> None:
        from .copying import is_archive

        full = os.path.join(context.root, path)
        if self.instruction.keyword == "ADD" and self.source is None and is_archive(full):
            copier.make_dirs(self.dest)
            copier.unpack(full, self.dest)
        elif os.path.isdir(full) and not os.path.islink(full):
            copier.make_dirs(os.path.dirname(self.dest.rstrip("/")) or "/")
            copier.tree(context.root, context.tree(path), self.dest.rstrip("/") or "/")
        else:
            target = os.path.join(self.dest, os.path.basename(path)) if into_dir else self.dest
            copier.make_dirs(os.path.dirname(target))
            copier.tree(context.root, [path], target)


def _owner(rootfs: str, spec: str, instruction: Instruction) -> tuple[int, int]:
    """``--chown``'s user and group, names looked up in the image's /etc/passwd and /etc/group (a user
    alone gives the group of the same number, as docker has it)."""
    from ..runtime.process import find_user

    user, _, group = spec.partition(":")
    # (resolved inside the rootfs: a symlink in the image never leads to the host's files)
    files = [os.path.join(rootfs, resolve_in_root(rootfs, f"etc/{name}")) for name in ("passwd", "group")]
    try:
        uid = find_user(user, *files).uid
        gid = find_user(f"{user}:{group}", *files).gid if group else uid
    except LayerfsError as e:
        raise instruction.error(f"--chown={spec}: {e}") from None
    return uid, gid


def _scratch_config(platform: str | None) -> dict:
    """An empty image's config, for ``platform`` (OS/ARCH[/VARIANT]; None: this host's)."""
    from ..distribution.pull import host_platform, parse_platform

    chosen = parse_platform(platform) if platform else host_platform()
    return {
        "architecture": chosen.architecture,
        **({"variant": chosen.variant} if chosen.variant else {}),
        "os": chosen.os,
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": []},
        "history": [],
    }


def _with_path(state: State) -> State:
    """A base image whose Env has no PATH gets the default one, as docker and buildah give it."""
    config = state.config.get("config") or {}
    if any(entry.startswith("PATH=") for entry in config.get("Env") or []):
        return state
    changed = copy.deepcopy(state.config)
    changed.setdefault("config", {})["Env"] = [f"PATH={DEFAULT_PATH}", *(config.get("Env") or [])]
    return State(changed, state.blobs, state.manifest_type)

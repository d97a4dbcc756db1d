"""What each instruction does to an image's config (docker's rules), and the words RUN runs.

ENV, USER, ENTRYPOINT, CMD, LABEL, EXPOSE, VOLUME, STOPSIGNAL, SHELL, HEALTHCHECK, MAINTAINER and ONBUILD
change the config alone (``configure``); WORKDIR changes it too, and the builder makes the directory where
it is missing; RUN, COPY and ADD change files, and the builder runs them.
History entries are written as docker's BuildKit writes them.
"""

from __future__ import annotations

import os

from .. import durations
from .dockerfile import Instruction, json_form, key_values, substitute, words

DEFAULT_SHELL = ["/bin/sh", "-c"]
CONFIG_ONLY = frozenset(
    "ENV WORKDIR USER ENTRYPOINT CMD LABEL EXPOSE VOLUME STOPSIGNAL SHELL HEALTHCHECK MAINTAINER ONBUILD".split()
)


def command(value: str, config: dict) -> list[str]:
    """RUN's, CMD's or ENTRYPOINT's words: the exec form's list, else the shell form run by the image's SHELL."""
    listed = json_form(value)
    return listed if listed is not None else [*(config.get("Shell") or DEFAULT_SHELL), value]


def env_of(config: dict) -> dict[str, str]:
    return dict(entry.partition("=")[::2] for entry in config.get("Env") or [])


def configure(instruction: Instruction, config: dict, variables: dict[str, str], cmd_set: bool) -> None:
    """Change ``config`` (an image config's ``config``) as ``instruction`` says. ``variables``: the args
    and env in effect, for substitution; ``cmd_set``: whether this stage has a CMD already (an ENTRYPOINT
    clears an inherited one)."""
    keyword, value = instruction.keyword, instruction.value
    if not value and keyword not in ("CMD", "ENTRYPOINT"):
        raise instruction.error("needs an argument")
    if keyword == "ENV":
        env = env_of(config)
        env.update(key_values(instruction, variables))
        config["Env"] = [f"{k}={v}" for k, v in env.items()]
    elif keyword == "LABEL":
        config["Labels"] = {**(config.get("Labels") or {}), **dict(key_values(instruction, variables))}
    elif keyword == "WORKDIR":
        path = substitute(value, variables)
        config["WorkingDir"] = os.path.normpath(os.path.join(config.get("WorkingDir") or "/", path))
    elif keyword == "USER":
        config["User"] = substitute(value, variables)
    elif keyword == "CMD":
        config["Cmd"] = command(value, config)
    elif keyword == "ENTRYPOINT":
        config["Entrypoint"] = command(value, config) if value else None
        if not cmd_set:
            config["Cmd"] = None
    elif keyword == "EXPOSE":
        ports = dict(config.get("ExposedPorts") or {})
        for port in words(value, variables):
            ports.update((p, {}) for p in _ports(instruction, port))
        config["ExposedPorts"] = ports
    elif keyword == "VOLUME":
        listed = json_form(value)
        paths = listed if listed is not None else words(value, variables)
        config["Volumes"] = {**(config.get("Volumes") or {}), **{p: {} for p in paths}}
    elif keyword == "STOPSIGNAL":
        config["StopSignal"] = substitute(value, variables)
    elif keyword == "SHELL":
        shell = json_form(value)
        if not shell:
            raise instruction.error('the shell must be given as a JSON list, such as ["/bin/bash", "-c"]')
        config["Shell"] = shell
    elif keyword == "HEALTHCHECK":
        config["Healthcheck"] = _healthcheck(instruction, config)
    elif keyword == "ONBUILD":
        config["OnBuild"] = [*(config.get("OnBuild") or []), value]


def _ports(instruction: Instruction, text: str) -> list[str]:
    """``80``, ``53/udp``, ``8000-8002/tcp`` as ExposedPorts keys."""
    number, _, protocol = text.partition("/")
    first, _, last = number.partition("-")
    if not first.isdigit() or not (last or first).isdigit() or protocol not in ("", "tcp", "udp", "sctp"):
        raise instruction.error(f"{text}: not a port")
    return [f"{port}/{protocol or 'tcp'}" for port in range(int(first), int(last or first) + 1)]


def _healthcheck(instruction: Instruction, config: dict) -> dict:
    """HEALTHCHECK NONE, or [--interval=D --timeout=D --start-period=D --start-interval=D --retries=N] CMD ..."""
    rest = instruction.value
    if rest.upper() == "NONE":
        return {"Test": ["NONE"]}
    check: dict = {}
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, _, value = word[2:].partition("=")
        if name == "retries" and value.isdigit():
            check["Retries"] = int(value)
        elif name in ("interval", "timeout", "start-period", "start-interval"):
            key = "".join(part.capitalize() for part in name.split("-"))
            check[key] = _duration(instruction, value)
        else:
            raise instruction.error(f"unknown flag --{name}")
    what, _, text = rest.partition(" ")
    if what.upper() != "CMD" or not text.strip():
        raise instruction.error("HEALTHCHECK [OPTIONS] CMD command, or HEALTHCHECK NONE")
    listed = json_form(text.strip())
    return {"Test": ["CMD", *listed] if listed is not None else ["CMD-SHELL", text.strip()], **check}


def _duration(instruction: Instruction, text: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds."""
    found = durations.nanoseconds(text)
    if found is None:
        raise instruction.error(f"{text}: not a duration")
    return found


def history_text(instruction: Instruction, argv: list[str] | None = None, args: dict[str, str] | None = None) -> str:
    """``created_by`` as BuildKit writes it: ``ENV A=1``; ``RUN |1 V=x /bin/sh -c make # buildkit``."""
    if instruction.keyword == "RUN" and argv is not None:
        used = f"|{len(args)} {' '.join(f'{k}={v}' for k, v in args.items())} " if args else ""
        return f"RUN {used}{' '.join(argv)} # buildkit"
    if instruction.keyword in ("COPY", "ADD"):
        return f"{instruction.keyword} {instruction.value} # buildkit"
    return f"{instruction.keyword} {instruction.value}"

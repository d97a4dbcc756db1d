"""A Dockerfile read into stages: dockerfile-parse (a well-kept parser, pure Python) finds the
instructions, their lines and values (continuation lines joined, comments and directives dropped); this
module groups them into stages and gives docker's word rules for them: variables substituted from the
args and env in effect, the JSON (exec) form, ``--flag=value`` options, ``KEY=VALUE`` lists.
"""

from __future__ import annotations

import io
import json
from typing import NamedTuple

from dockerfile_parse import DockerfileParser
from dockerfile_parse.util import WordSplitter, extract_key_values

from ..errors import LayerfsError

KNOWN = frozenset(
    "FROM RUN COPY ADD ENV ARG WORKDIR USER ENTRYPOINT CMD LABEL EXPOSE VOLUME STOPSIGNAL SHELL HEALTHCHECK "
    "MAINTAINER ONBUILD".split()
)


class Instruction(NamedTuple):
    keyword: str  # upper case: RUN, COPY...
    value: str  # as written, continuation lines joined
    line: int  # 1-based, its first line
    where: str  # the Dockerfile's name, for errors

    def error(self, message: str) -> LayerfsError:
        """``Dockerfile:7: COPY: app.py: no such file in the context``."""
        return LayerfsError(f"{self.where}:{self.line}: {self.keyword}: {message}")


class Stage(NamedTuple):
    base: str  # the FROM's image, unsubstituted
    name: str | None  # ``AS name``, lower case
    number: int
    from_line: Instruction
    instructions: list[Instruction]


class Dockerfile(NamedTuple):
    global_args: list[Instruction]  # the ARGs before the first FROM
    stages: list[Stage]


def parse(text: str, where: str = "Dockerfile") -> Dockerfile:
    """The stages of a Dockerfile; a one-line error naming the line for what docker refuses to read."""
    parser = DockerfileParser(fileobj=io.BytesIO(text.encode()))
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    for item in parser.structure:
        keyword = item["instruction"]
        if keyword == "COMMENT":
            continue
        instruction = Instruction(keyword, item["value"].strip(), item["startline"] + 1, where)
        if keyword not in KNOWN:
            raise instruction.error("unknown instruction")
        if keyword == "FROM":
            words = instruction.value.split()
            words = [w for w in words if not w.startswith("--platform=")]
            if len(words) == 3 and words[1].lower() == "as":
                stages.append(Stage(words[0], words[2].lower(), len(stages), instruction, []))
            elif len(words) == 1:
                stages.append(Stage(words[0], None, len(stages), instruction, []))
            else:
                raise instruction.error("FROM IMAGE [AS NAME] expected")
        elif not stages:
            if keyword != "ARG":
                raise instruction.error("no FROM before it (only ARG may come first)")
            global_args.append(instruction)
        else:
            stages[-1].instructions.append(instruction)
    if not stages:
        raise LayerfsError(f"{where}: no FROM instruction")
    return Dockerfile(global_args, stages)


def substitute(text: str, variables: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` replaced (unset: empty), quotes kept: the text docker would run or store."""
    return "".join(WordSplitter(text, envs=variables).split(maxsplit=0, dequote=False))


def words(text: str, variables: dict[str, str] | None = None) -> list[str]:
    """``text`` split at unquoted blanks, quotes removed, variables substituted where ``variables`` given."""
    return list(WordSplitter(text, envs=variables).split())


def json_form(text: str) -> list[str] | None:
    """The exec form's list (``["a", "b"]``), or None where ``text`` is not one (the shell form)."""
    if not text.startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(w, str) for w in value):
        return value
    return None


def flags(instruction: Instruction, allowed: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """The leading ``--name=value`` options of ``instruction`` and the rest of its value."""
    found: dict[str, str] = {}
    rest = instruction.value
    while rest.startswith("--"):
        word, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, equals, value = word[2:].partition("=")
        if name not in allowed:
            raise instruction.error(f"unknown flag --{name}")
        found[name] = value if equals else "true"
    return found, rest


def key_values(instruction: Instruction, variables: dict[str, str]) -> list[tuple[str, str]]:
    """ENV's and LABEL's ``K=V K2="V 2"`` (or the old ``K V``) pairs, variables substituted."""
    if not instruction.value:
        raise instruction.error("needs at least one argument")
    try:
        return extract_key_values(True, {}, variables, instruction.value)
    except ValueError as e:
        raise instruction.error(str(e)) from None

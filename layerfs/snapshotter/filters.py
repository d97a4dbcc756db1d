"""containerd's filter language (its filters package), for List: ``kind==active,labels."a.b"==x``.

A filter is selectors joined by ``,``, all of which must match; a request's several filters match when
any does. A selector is a field path (``name``, ``parent``, ``kind``, ``labels.KEY``; a part may be
quoted), then either nothing (the field is present and not empty) or ``==``, ``!=`` or ``~=`` (a regular
expression) and a value, quoted or up to the next comma.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence

from .metadata import InvalidArgument, Snapshot

_QUOTED = r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'"
_FIELD = re.compile(rf"\s*({_QUOTED}|[A-Za-z][A-Za-z0-9_]*)\s*")
_OPERATOR = re.compile(r"\s*(==|!=|~=)\s*")
_VALUE = re.compile(rf"\s*({_QUOTED}|/(?:[^/\\]|\\.)*/|\|(?:[^|\\]|\\.)*\||[^\s,]+)\s*")

Selector = Callable[[Snapshot], bool]


def matcher(filters: Sequence[str]) -> Selector:
    """Whether a snapshot matches any of ``filters`` (all snapshots do when there are none)."""
    parsed = [_filter(text) for text in filters if text]
    if not parsed:
        return lambda snapshot: True
    return lambda snapshot: any(all(selector(snapshot) for selector in selectors) for selectors in parsed)


def _filter(text: str) -> list[Selector]:
    selectors, at = [], 0
    while True:
        selector, at = _selector(text, at)
        selectors.append(selector)
        if at == len(text):
            return selectors
        if text[at] != ",":
            raise InvalidArgument(f"filter {text!r}: unexpected input at {at}")
        at += 1


def _unquote(token: str, *, regex: bool = False) -> str:
    if token[0] in "\"'":
        return ast.literal_eval(token)
    if regex and token[0] in "/|":
        return token[1:-1]
    return token


def _selector(text: str, at: int) -> tuple[Selector, int]:
    path = []
    while True:
        found = _FIELD.match(text, at)
        if found is None:
            raise InvalidArgument(f"filter {text!r}: a field expected at {at}")
        path.append(_unquote(found.group(1)))
        at = found.end()
        if not text.startswith(".", at):
            break
        at += 1
    value_of = _field(path)
    operator = _OPERATOR.match(text, at)
    if operator is None:
        return (lambda snapshot: bool(value_of(snapshot))), at
    found = _VALUE.match(text, operator.end())
    if found is None:
        raise InvalidArgument(f"filter {text!r}: a value expected at {operator.end()}")
    op = operator.group(1)
    value = _unquote(found.group(1), regex=op == "~=")
    if op == "==":
        return (lambda snapshot: value_of(snapshot) == value), found.end()
    if op == "!=":
        return (lambda snapshot: value_of(snapshot) != value), found.end()
    try:
        pattern = re.compile(value)
    except re.error as e:
        raise InvalidArgument(f"filter {text!r}: {e}") from None
    return (lambda snapshot: (v := value_of(snapshot)) is not None and bool(pattern.search(v))), found.end()


def _field(path: list[str]) -> Callable[[Snapshot], str | None]:
    """What a field path names in a snapshot (None: nothing there), as containerd's snapshot adaptor."""
    head = path[0]
    if head == "labels" and len(path) > 1:
        label = ".".join(path[1:])
        return lambda snapshot: snapshot.labels.get(label)
    if len(path) == 1 and head in ("name", "parent", "kind"):
        attribute = "key" if head == "name" else head
        return lambda snapshot: getattr(snapshot, attribute)
    return lambda snapshot: None

"""The YAML side of the configuration: ruamel.yaml nodes to data, with positions.

``YamlConfigSource`` composes the file with ruamel.yaml (YAML 1.2 plain
scalars, duplicate keys refused, alias bombs and deep nesting refused),
builds plain data from the node graph, and remembers where every key path
came from, so that a pydantic ``ValidationError`` can be reported as
``FILE:LINE:COL: key.path: message`` -- or as the environment variable that
set the value.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource
from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from ruamel.yaml.reader import ReaderError

from gpopd.errors import ConfigError

# Keys that identify one mailbox make no sense as a default for all of them.
PER_ACCOUNT_KEYS = frozenset({"name", "host", "username", "password", "oauth"})


def merges_with(default: object, own: object) -> bool:
    """Whether an account's mapping is completed from the default's (same or no ``type``)."""
    return (
        isinstance(default, Mapping)
        and isinstance(own, Mapping)
        and own.get("type", default.get("type")) == default.get("type")
    )


_CORE_TAG = "tag:yaml.org,2002:"
_IMPLICIT_TAGS = frozenset(_CORE_TAG + t for t in ("null", "bool", "int", "float", "timestamp"))
# Aliases can make a small file expand exponentially ("billion laughs").
MAX_YAML_VALUES = 100_000
MAX_YAML_DEPTH = 64
_YAML_NULL = re.compile(r"~|null|Null|NULL|")
_YAML_BOOL = {
    "true": True,
    "True": True,
    "TRUE": True,
    "false": False,
    "False": False,
    "FALSE": False,
}
_YAML_INT = re.compile(r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+")
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
_YAML_SPECIAL_FLOAT = re.compile(r"([-+]?)\.(inf|Inf|INF)|\.(nan|NaN|NAN)")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_@-]+")


def _core_scalar(text: str) -> Any:
    """Resolve a plain scalar by the YAML 1.2 core schema, whatever ``%YAML`` said."""
    if _YAML_NULL.fullmatch(text):
        return None
    if text in _YAML_BOOL:
        return _YAML_BOOL[text]
    if _YAML_INT.fullmatch(text):
        try:
            if text[:2] in ("0o", "0x"):
                return int(text[2:], 8 if text[1] == "o" else 16)
            return int(text)
        except ValueError:  # beyond Python's limit on digits: leave it to validation
            return text
    if _YAML_FLOAT.fullmatch(text):
        return float(text)
    if match := _YAML_SPECIAL_FLOAT.fullmatch(text):
        return math.nan if match.group(3) else float(f"{match.group(1)}inf")
    return text


def _display(path: tuple[str | int, ...]) -> str:
    shown = ""
    for seg in path:
        if isinstance(seg, int):
            shown += f"[{seg}]"
        else:
            text = seg if _PLAIN_KEY.fullmatch(seg) else json.dumps(seg, ensure_ascii=False)
            shown += f".{text}" if shown else text
    return shown


def _pos(mark: Any) -> tuple[int, int]:
    return (getattr(mark, "line", 0) + 1, getattr(mark, "column", 0) + 1)


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a value was written: its key (if any) and the value itself, 1-based."""

    key: tuple[int, int] | None
    value: tuple[int, int]
    scalar: bool


KeyPath = tuple[str | int, ...]


class _Origins:
    """Where each key path's value came from, as a tree: replacing a value drops its subtree."""

    __slots__ = ("children", "origin")

    def __init__(self, origin: _Where | str | None) -> None:
        self.origin = origin
        self.children: dict[str | int, _Origins] = {}

    def set(self, path: KeyPath, origin: _Where | str) -> None:
        node = self
        for seg in path[:-1]:
            node = node.children.setdefault(seg, _Origins(None))
        if path:
            node.children[path[-1]] = _Origins(origin)
        else:
            self.origin, self.children = origin, {}

    def nearest(self, path: KeyPath) -> tuple[bool, _Where | str | None]:
        """The origin of ``path`` or of its nearest recorded ancestor; whether it was exact."""
        node, found, exact = self, self.origin, True
        for seg in path:
            child = node.children.get(seg)
            if child is None:
                return False, found
            node = child
            if node.origin is not None:
                found, exact = node.origin, True
            else:
                exact = False
        return exact, found


class _TooLarge(Exception):
    pass


class YamlConfigSource(PydanticBaseSettingsSource):
    """A settings source reading one YAML file through ruamel.yaml's node graph.

    Building the data from nodes (rather than letting ruamel construct it)
    keeps the line and column of every key and value, reports duplicate keys
    without echoing their values, and refuses tags that would construct
    anything but plain data.  ``origins`` records for each key path where it was
    written, or the name of the environment variable that replaced it.
    """

    def __init__(self, settings_cls: type[BaseSettings], path: Path, raw: bytes) -> None:
        super().__init__(settings_cls)
        self.path = path
        self.origins = _Origins(_Where(None, (1, 1), False))
        self._problems: list[tuple[tuple[int, int, int], str]] = []
        self._bad: set[KeyPath] = set()
        self._count = 0
        root = self._compose(self._decode(raw))
        try:
            self.data: Any = {} if root is None else self._child(root, (), None, frozenset(), 0)
        except _TooLarge as exc:
            raise ConfigError([f"{path}: {exc}"]) from None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        found = self.data.get(field_name) if isinstance(self.data, dict) else None
        return found, field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self.data) if isinstance(self.data, dict) else {}

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise ConfigError([f"{self.path}:{line}:{col}: not valid UTF-8 text"]) from None

    def _compose(self, text: str) -> Node | None:
        yaml = YAML(typ="rt", pure=True)
        # Reused anchors are legal YAML (the latest one counts); ruamel would
        # warn, and warnings filters are process-wide, so switch it off here.
        yaml.composer.warn_double_anchors = False
        try:
            node: Node | None = yaml.compose(text)
            return node
        except MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            where = f"{self.path}:{_pos(mark)[0]}:{_pos(mark)[1]}" if mark else str(self.path)
            # problem/context are the parser's words; the snippet (which may
            # show a secret) is left out on purpose.
            detail = exc.problem or "not valid YAML"
            if exc.context:
                ctx_line = f" at line {_pos(exc.context_mark)[0]}" if exc.context_mark else ""
                detail = f"{exc.context}{ctx_line}: {detail}"
            raise ConfigError([f"{where}: YAML syntax error: {detail}"]) from None
        except ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
            raise ConfigError(
                [f"{self.path}:{line}:{col}: characters of this kind are not allowed in YAML"]
            ) from None
        except RecursionError:
            raise ConfigError([f"{self.path}: nested too deeply"]) from None
        except Exception as exc:  # the parser reads untrusted text: any failure is the file's
            raise ConfigError([f"{self.path}: not valid YAML ({type(exc).__name__})"]) from None

    def problem(self, pos: tuple[int, int], path: KeyPath, message: str) -> None:
        shown = f"{_display(path)}: " if path else ""
        self._problems.append(((0, *pos), f"{self.path}:{pos[0]}:{pos[1]}: {shown}{message}"))

    def add_problem(self, where: str, message: str) -> None:
        """A problem with no place in the file (an environment variable's)."""
        self._problems.append(((1, 0, 0), f"{where}: {message}"))

    @property
    def problems(self) -> list[str]:
        """Every problem found so far, in file order, each once."""
        return list(dict.fromkeys(m for _, m in sorted(self._problems, key=lambda p: p[0])))

    def _child(
        self,
        node: Node,
        path: KeyPath,
        key: tuple[int, int] | None,
        active: frozenset[int],
        depth: int,
    ) -> Any:
        self._count += 1
        if self._count > MAX_YAML_VALUES or depth > MAX_YAML_DEPTH:
            raise _TooLarge(
                f"more than {MAX_YAML_VALUES} values or {MAX_YAML_DEPTH} levels "
                "(after expanding aliases)"
            )
        # An empty value is marked where the next token starts; its key is clearer.
        scalar = isinstance(node, ScalarNode) and (node.value != "" or node.style is not None)
        self.origins.set(path, _Where(key, _pos(node.start_mark), scalar))
        tag = str(node.tag) if node.tag is not None else ""
        if isinstance(node, ScalarNode):
            if tag == _CORE_TAG + "str":
                return str(node.value)
            if tag in _IMPLICIT_TAGS:
                return _core_scalar(str(node.value))
        elif id(node) in active:
            self._bad.add(path)
            self.problem(_pos(node.start_mark), path, "an alias refers to its own ancestor")
            return None
        elif isinstance(node, SequenceNode) and tag == _CORE_TAG + "seq":
            inner = active | {id(node)}
            return [
                self._child(item, (*path, i), None, inner, depth + 1)
                for i, item in enumerate(node.value)
            ]
        elif isinstance(node, MappingNode) and tag == _CORE_TAG + "map":
            return self._mapping(node, path, active | {id(node)}, depth)
        self._bad.add(path)
        shown = tag.replace(_CORE_TAG, "!!", 1) if tag.startswith(_CORE_TAG) else tag or "?"
        self.problem(_pos(node.start_mark), path, f"unsupported YAML tag {shown}")
        return None

    def _mapping(
        self, node: MappingNode, path: KeyPath, active: frozenset[int], depth: int
    ) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merges = [v for k, v in node.value if str(k.tag) == _CORE_TAG + "merge"]
        # Merged mappings first, so that explicit keys override them; the
        # earliest merged mapping wins, as YAML's merge key specifies.
        for merge in reversed(merges):
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for source in reversed(sources):
                if not isinstance(source, MappingNode) or id(source) in active:
                    self.problem(_pos(merge.start_mark), path, "<< must merge mappings")
                    continue
                result.update(self._mapping(source, path, active | {id(source)}, depth))
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            if str(key_node.tag) == _CORE_TAG + "merge":
                continue
            key_pos = _pos(key_node.start_mark)
            if not isinstance(key_node, ScalarNode):
                self.problem(key_pos, path, "a key must be plain text")
                continue
            key = str(key_node.value)
            if key in first:
                self._bad.add((*path, key))
                self.problem(key_pos, (*path, key), f"duplicate key (first at line {first[key]})")
                continue
            first[key] = key_pos[0]
            result[key] = self._child(value_node, (*path, key), key_pos, active, depth + 1)
        return result

    def merge(self, incoming: dict[str, Any], variable: str) -> None:
        """Deep-merge values from the environment variable ``variable`` over the file's."""
        if not isinstance(self.data, dict):
            return  # the file's own error (not a mapping) is what to fix first
        stack: list[tuple[dict[str, Any], dict[str, Any], KeyPath]] = [(self.data, incoming, ())]
        while stack:
            target, new, path = stack.pop()
            for key, value in new.items():
                here = (*path, key)
                if isinstance(value, dict) and isinstance(target.get(key), dict):
                    stack.append((target[key], value, here))
                else:
                    target[key] = value
                    self.origins.set(here, variable)

    def add_validation_errors(self, exc: ValidationError) -> None:
        """Turn pydantic's errors into located problems, never showing an input value."""
        found: list[tuple[tuple[int, int, int], str, str, str, bool]] = []
        for error in exc.errors(include_url=False, include_input=False):
            loc: list[str | int] = list(error["loc"])
            message, ctx = error["msg"], error.get("ctx") or {}
            if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                loc.append(str(ctx.get("discriminator", "type")).strip("'"))
                expected = ctx.get("expected_tags")
                if isinstance(expected, str):
                    head, _, tail = expected.rpartition(", ")
                    message = (
                        f"Input should be {head} or {tail}" if head else f"Input should be {tail}"
                    )
                else:
                    message = "Field required"
            if not loc and error["type"] == "model_type":
                message = "the file must be a mapping of settings (key: value lines)"
            if isinstance(ctx.get("gpopd_key"), str):
                loc.append(ctx["gpopd_key"])
            if (
                error["type"] == "extra_forbidden"
                and len(loc) == 2
                and loc[0] == "defaults"
                and loc[1] in PER_ACCOUNT_KEYS
            ):
                message = "is set per account and cannot be a default"
            path, origin, from_defaults, key_error = self._walk(loc)
            if any(origin[: len(bad)] == bad for bad in self._bad):
                continue  # already reported as a YAML problem
            where, sort = self._where(origin, key_error or error["type"] == "extra_forbidden")
            found.append((sort, where, _display(path), message, from_defaults))
        # A bad value in ``defaults`` is reported once, at ``defaults``, not
        # again for every account that inherits it.
        reported = {(where, msg) for _, where, _, msg, inherited in found if not inherited}
        for sort, where, shown, message, inherited in found:
            if not (inherited and (where, message) in reported):
                text = f"{where}: {shown}: {message}" if shown else f"{where}: {message}"
                self._problems.append((sort, text))

    def _walk(self, loc: list[str | int]) -> tuple[KeyPath, KeyPath, bool, bool]:
        """Follow pydantic's ``loc`` through the data, skipping union tags and validator names.

        Returns the path to show, the path of the value that was written (under
        ``defaults`` when an account inherited it), whether it was inherited,
        and whether the error is about a mapping key rather than its value.
        """
        data = self.data
        defaults = data.get("defaults") if isinstance(data, dict) else None
        cur: Any = data
        default: Any = None  # the part of ``defaults`` that ``cur`` inherits from
        shown: list[str | int] = []
        origin: list[str | int] = []
        from_defaults = key_error = False
        for i, seg in enumerate(loc):
            last = i == len(loc) - 1
            if seg == "[key]":
                key_error = True
                continue
            if isinstance(cur, dict):
                if not last and isinstance(seg, str) and seg == cur.get("type"):
                    continue  # a discriminated union's tag
                if seg in cur:
                    cur = cur[seg]
                    following = default.get(seg) if isinstance(default, dict) else None
                    default = following if merges_with(following, cur) else None
                elif isinstance(default, dict) and seg in default and seg not in PER_ACCOUNT_KEYS:
                    cur, origin, from_defaults = default[seg], ["defaults", *shown[2:]], True
                    default = None
                elif not last:
                    continue
                else:
                    cur = None
            elif isinstance(cur, list) and isinstance(seg, int) and 0 <= seg < len(cur):
                cur = cur[seg]
            elif not last:
                continue
            else:
                cur = None
            shown.append(seg)
            origin.append(seg)
            if len(shown) == 2 and shown[0] == "accounts":
                default = defaults
        return tuple(shown), tuple(origin), from_defaults, key_error

    def _where(self, path: KeyPath, prefer_key: bool) -> tuple[str, tuple[int, int, int]]:
        """Where to point for ``path``: the value, its key, or the nearest written parent."""
        exact, found = self.origins.nearest(path)
        if isinstance(found, str):
            return f"environment variable {found}", (1, 0, 0)
        if found is None:
            return str(self.path), (0, 0, 0)
        on_value = exact and found.scalar and not prefer_key
        line, col = found.value if on_value else (found.key or found.value)
        return f"{self.path}:{line}:{col}", (0, line, col)

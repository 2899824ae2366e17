"""Profile text to plain data: YAML/JSON parsing, duplicate keys, and line numbers for messages."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from mixprec.errors import ProfileError

MAX_NESTING = 200
"""Deepest bracket nesting a profile may have (real ones stay under 10). PyYAML takes time
quadratic in the nesting before it fails, so deeper text is refused before it is parsed."""


def _flow_depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside quoted strings (a cheap, slightly generous scan)."""
    depth = deepest = 0
    quote = ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_text(text: str, source: str, is_json: bool) -> Any:
    if _flow_depth(text) > MAX_NESTING:
        raise ProfileError(f"{source}: nested too deeply to be a profile (more than {MAX_NESTING} levels)")
    _check_duplicate_keys(text, source)
    if is_json:

        def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in pairs]
            for key in keys:
                if keys.count(key) > 1:  # only without PyYAML, which finds the line
                    raise ProfileError(f"{source}: key {key!r} appears twice in one object; keep one")
            return dict(pairs)

        try:
            return json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as exc:
            raise ProfileError(f"{source} line {exc.lineno}: invalid JSON: {exc.msg}") from exc
    yaml = yaml_module()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ProfileError(f"{source}{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc


def _check_duplicate_keys(text: str, source: str) -> None:
    """Refuse a key given twice in one mapping: both parsers would keep the last one silently,
    dropping a request setting the user wrote. JSON is (nearly) YAML, so one walk serves both."""
    try:
        import yaml

        root = yaml.compose(text)
    except Exception:  # noqa: BLE001 (no PyYAML, or bad syntax: the parser reports the latter)
        return
    stack = [root]
    while stack:  # iterative: depth is bounded by the composer, not by this walk
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                if key is not None and key in first:
                    raise ProfileError(
                        f"{source} line {line}: key {key!r} appears twice in one mapping "
                        f"(first at line {first[key]}); keep one"
                    )
                if key is not None:
                    first[key] = line
            stack.extend(v for _, v in reversed(node.value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed(node.value))


def yaml_module() -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise ProfileError(
            "YAML profiles need PyYAML: pip install 'mixprec[cli]' (or use a .json profile)"
        ) from exc
    return yaml


@dataclass
class Lines:
    """1-based line numbers of top-level keys and request entries, for error messages (best effort)."""

    keys: dict[str, int] = field(default_factory=dict)
    entries: list[int] = field(default_factory=list)

    @staticmethod
    def of(text: str) -> Lines:
        # JSON is (nearly) YAML, so one composer serves both; without PyYAML, messages name entries only.
        try:
            import yaml

            root = yaml.compose(text)
        except Exception:  # noqa: BLE001 (positions are a nicety; the parse itself already succeeded)
            return Lines()
        lines = Lines()
        if isinstance(root, yaml.MappingNode):
            for key_node, value_node in root.value:
                lines.keys[str(key_node.value)] = key_node.start_mark.line + 1
                if key_node.value == "requests" and isinstance(value_node, yaml.SequenceNode):
                    lines.entries = [item.start_mark.line + 1 for item in value_node.value]
        return lines

    def at_key(self, key: Any) -> str:
        line = self.keys.get(str(key))
        return f" line {line}" if line is not None else ""

    def entry(self, index: int) -> int | None:
        return self.entries[index] if index < len(self.entries) else None

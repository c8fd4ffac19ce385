"""Rate-limit configuration in envoyproxy/ratelimit's YAML format, checked strictly.

One file per domain::

    domain: sluice
    descriptors:
      - key: api_key
        rate_limit: {unit: minute, requests_per_unit: 600}
        descriptors:
          - key: method
            value: /sluice.generation.v1.Generation/Generate
            rate_limits:                       # several limits on one descriptor
              - {unit: minute, requests_per_unit: 60, name: per-minute}
              - {unit: day, requests_per_unit: 10000, name: per-day}
      - key: api_key
        value: "anon*"                         # wildcards: `*` matches any run of characters
        shadow_mode: true                      # counted, never enforced
        rate_limit: {unit: second, requests_per_unit: 1}

Beyond the reference format: ``rate_limits`` (a list) for several limits on one
descriptor. Unknown keys and bad values are errors that name the file, the
place in it and the reason; nothing is silently ignored.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

UNIT_SECONDS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "week": 7 * 86400,
    "month": 30 * 86400,
    "year": 365 * 86400,
}
logger = logging.getLogger(__name__)

# Envoy's API carries a limit as a uint32.
MAX_REQUESTS_PER_UNIT = 2**32 - 1
# The response's RateLimit.Unit values (WEEK is 7; the others follow SECOND = 1).
UNIT_PROTO = {"second": 1, "minute": 2, "hour": 3, "day": 4, "week": 7, "month": 5, "year": 6}
# A descriptor's limit override uses envoy.type.v3.RateLimitUnit, which has no week.
OVERRIDE_UNITS = {1: "second", 2: "minute", 3: "hour", 4: "day", 5: "month", 6: "year"}

_DESCRIPTOR_KEYS = {"key", "value", "rate_limit", "rate_limits", "shadow_mode", "descriptors"}
_LIMIT_KEYS = {"unit", "requests_per_unit", "unlimited", "name", "replaces"}
# Keys of the reference format that sluice does not implement (per-value metrics, shared
# thresholds, quota mode, metadata): upstream's files are taken as they are, each such key
# named in a warning, so that nobody believes it applies.
_NOT_IMPLEMENTED = {"quota_mode", "detailed_metric", "value_to_metric", "share_threshold", "metadata"}


class ConfigError(Exception):
    """A configuration that cannot be used; the message names file, place and reason."""


@dataclass(frozen=True)
class Limit:
    requests_per_unit: int
    unit: str
    name: str = ""

    @property
    def period_s(self) -> int:
        return UNIT_SECONDS[self.unit]


@dataclass(frozen=True)
class Rule:
    """What applies to a descriptor that matched a configured path."""

    path: str  # the configured keys and values, for metrics: "api_key.method=/x"
    limits: tuple[Limit, ...] = ()
    unlimited: bool = False
    shadow_mode: bool = False
    replaces: frozenset[str] = frozenset()


@dataclass
class _Node:
    rule: Rule | None
    children: _Level


@dataclass
class _Level:
    exact: dict[tuple[str, str], _Node] = field(default_factory=dict)
    wildcard: list[tuple[str, re.Pattern[str], _Node]] = field(default_factory=list)
    key_only: dict[str, _Node] = field(default_factory=dict)

    def find(self, key: str, value: str) -> _Node | None:
        # Most specific first: the exact value, a wildcard value, then the key alone.
        if (node := self.exact.get((key, value))) is not None:
            return node
        for wild_key, pattern, node in self.wildcard:
            if wild_key == key and pattern.fullmatch(value):
                return node
        return self.key_only.get(key)


@dataclass(frozen=True)
class Domain:
    name: str
    source: Path
    _root: _Level

    def match(self, entries: Sequence[tuple[str, str]]) -> Rule | None:
        """The rule for a descriptor's entries, if every entry matches a level of the tree."""
        level = self._root
        node: _Node | None = None
        for key, value in entries:
            node = level.find(key, value)
            if node is None:
                return None
            level = node.children
        return node.rule if node is not None else None


@dataclass(frozen=True)
class Config:
    domains: dict[str, Domain]
    files: tuple[Path, ...]


def config_files(paths: Iterable[Path]) -> list[Path]:
    """The YAML files named, or found in the folders named, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"{path}: no such file or folder")
    return files


def load(paths: Iterable[Path]) -> Config:
    files = config_files(paths)
    domains: dict[str, Domain] = {}
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        domain = parse(text, path)
        if domain.name in domains:
            raise ConfigError(f"{path}: domain {domain.name!r} is already defined in {domains[domain.name].source}")
        domains[domain.name] = domain
    return Config(domains, tuple(files))


def parse(text: str, source: Path) -> Domain:
    try:
        return _parse(text, source)
    except RecursionError:  # in the YAML parser or in ours
        raise ConfigError(f"{source}: nested too deeply") from None


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key written twice in one mapping (PyYAML keeps the last one, silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: list[object] = []
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _parse(text: str, source: Path) -> Domain:
    try:
        document = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    where = _Where(source)
    top = where.mapping(document, "", {"domain", "descriptors"})
    name = where.string(top.get("domain"), "domain", required=True)
    descriptors = where.sequence(top.get("descriptors", []), "descriptors")
    return Domain(name, source, _level(where, descriptors, "descriptors", []))


class _Where:
    """Builds error messages that name the file and the place in it."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, place: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: {place or 'top level'}: {reason}")

    def mapping(self, value: Any, place: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(place, "expected a mapping")
        for key in value:
            if key in _NOT_IMPLEMENTED:
                logger.warning("%s: %s: accepted but not implemented by sluice", self.source, _join(place, str(key)))
                continue
            if key not in allowed:
                raise self.fail(_join(place, str(key)), f"unknown key (expected one of {', '.join(sorted(allowed))})")
        return value

    def sequence(self, value: Any, place: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(place, "expected a list")
        return value

    def string(self, value: Any, place: str, required: bool = False) -> str:
        if value is None and not required:
            return ""
        if not isinstance(value, str) or (required and not value):
            raise self.fail(place, "expected a non-empty string" if required else "expected a string")
        return value

    def boolean(self, value: Any, place: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(place, "expected true or false")
        return value


def _join(place: str, key: str) -> str:
    return f"{place}.{key}" if place else key


def _level(where: _Where, descriptors: list[Any], place: str, parents: list[str]) -> _Level:
    level = _Level()
    for i, raw in enumerate(descriptors):
        here = f"{place}[{i}]"
        item = where.mapping(raw, here, _DESCRIPTOR_KEYS)
        key = where.string(item.get("key"), _join(here, "key"), required=True)
        value = where.string(item.get("value"), _join(here, "value")) if "value" in item else None
        path = [*parents, key if value is None else f"{key}={value}"]
        rule = _rule(where, item, here, ".".join(path))
        children = where.sequence(item.get("descriptors", []), _join(here, "descriptors"))
        node = _Node(rule, _level(where, children, _join(here, "descriptors"), path))
        if value is None:
            if key in level.key_only:
                raise where.fail(here, f"a second descriptor for key {key!r} without a value")
            level.key_only[key] = node
        elif "*" in value:
            pattern = re.compile(".*".join(re.escape(part) for part in value.split("*")))
            level.wildcard.append((key, pattern, node))
        else:
            if (key, value) in level.exact:
                raise where.fail(here, f"a second descriptor for {key}={value!r}")
            level.exact[(key, value)] = node
    return level


def _rule(where: _Where, item: dict[str, Any], place: str, path: str) -> Rule | None:
    shadow = where.boolean(item["shadow_mode"], _join(place, "shadow_mode")) if "shadow_mode" in item else False
    if "rate_limit" in item and "rate_limits" in item:
        raise where.fail(place, "give either rate_limit or rate_limits, not both")
    if "rate_limit" in item:
        raws = [(item["rate_limit"], _join(place, "rate_limit"))]
    elif "rate_limits" in item:
        listed = where.sequence(item["rate_limits"], _join(place, "rate_limits"))
        if not listed:
            raise where.fail(_join(place, "rate_limits"), "expected at least one limit")
        raws = [(raw, f"{_join(place, 'rate_limits')}[{i}]") for i, raw in enumerate(listed)]
    else:
        if shadow:
            raise where.fail(_join(place, "shadow_mode"), "there is no rate_limit to run in shadow mode")
        return None
    limits: list[Limit] = []
    unlimited = False
    replaces: set[str] = set()
    for raw, here in raws:
        spec = where.mapping(raw, here, _LIMIT_KEYS)
        name = where.string(spec.get("name"), _join(here, "name"))
        for j, replaced in enumerate(where.sequence(spec.get("replaces", []), _join(here, "replaces"))):
            entry = where.mapping(replaced, f"{_join(here, 'replaces')}[{j}]", {"name"})
            replaces.add(where.string(entry.get("name"), f"{_join(here, 'replaces')}[{j}].name", required=True))
        if spec.get("unlimited", False):
            where.boolean(spec["unlimited"], _join(here, "unlimited"))
            if "unit" in spec or "requests_per_unit" in spec:
                raise where.fail(here, "an unlimited limit takes no unit or requests_per_unit")
            if len(raws) > 1:
                raise where.fail(here, "unlimited cannot be combined with other limits on one descriptor")
            unlimited = True
            continue
        unit = where.string(spec.get("unit"), _join(here, "unit"), required=True).lower()
        if unit not in UNIT_SECONDS:
            raise where.fail(_join(here, "unit"), f"unknown unit {unit!r} (one of {', '.join(UNIT_SECONDS)})")
        count = spec.get("requests_per_unit")
        # 0 blocks every request (upstream's block-list pattern).
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_REQUESTS_PER_UNIT:
            raise where.fail(
                _join(here, "requests_per_unit"), f"expected a whole number from 0 to {MAX_REQUESTS_PER_UNIT}"
            )
        limits.append(Limit(count, unit, name))
    return Rule(path, tuple(limits), unlimited, shadow, frozenset(replaces))

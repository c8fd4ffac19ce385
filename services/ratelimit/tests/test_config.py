"""The configuration format: what it accepts, what it refuses (naming file, place and reason), how it matches."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

import pytest

from sluice_ratelimit.config import ConfigError, Limit, load, parse
from sluice_ratelimit.reload import ConfigStore

EXAMPLE = """
domain: edge
descriptors:
  - key: api_key
    value: anonymous
    rate_limit: {unit: minute, requests_per_unit: 60}
  - key: api_key
    value: "team-*"
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 5}
  - key: api_key
    descriptors:
      - key: method
        value: /sluice.generation.v1.Generation/Generate
        rate_limits:
          - {unit: minute, requests_per_unit: 100, name: per-minute}
          - {unit: day, requests_per_unit: 10000, name: per-day}
      - key: method
        rate_limit: {unlimited: true}
  - key: internal
    rate_limit: {unit: hour, requests_per_unit: 1000, name: internal, replaces: [{name: per-minute}]}
"""


def test_matches_the_most_specific_descriptor() -> None:
    edge = parse(EXAMPLE, Path("edge.yaml"))
    anonymous = edge.match([("api_key", "anonymous")])
    assert anonymous is not None and anonymous.limits == (Limit(60, "minute"),)
    team = edge.match([("api_key", "team-blue")])
    assert team is not None and team.shadow_mode and team.path == "api_key=team-*"
    generate = edge.match([("api_key", "k1"), ("method", "/sluice.generation.v1.Generation/Generate")])
    assert generate is not None
    assert [(lim.requests_per_unit, lim.unit, lim.name) for lim in generate.limits] == [
        (100, "minute", "per-minute"),
        (10000, "day", "per-day"),
    ]
    other = edge.match([("api_key", "k1"), ("method", "/other")])
    assert other is not None and other.unlimited
    internal = edge.match([("internal", "x")])
    assert internal is not None and internal.replaces == {"per-minute"}


def test_unmatched_descriptors_have_no_rule() -> None:
    edge = parse(EXAMPLE, Path("edge.yaml"))
    assert edge.match([("tenant", "t1")]) is None
    assert edge.match([("api_key", "k1")]) is None  # no limit at that level
    assert edge.match([("api_key", "k1"), ("method", "/m"), ("deeper", "x")]) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: fortnight, requests_per_unit: 1}\n",
         "descriptors[0].rate_limit.unit: unknown unit 'fortnight'"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: -1}\n",
         "descriptors[0].rate_limit.requests_per_unit: expected a whole number from 0 to 4294967295"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: minute, requests_per_unit: '5'}\n",
         "requests_per_unit: expected a whole number from 0"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: month, requests_per_unit: 5000000000}\n",
         "requests_per_unit: expected a whole number from 0 to 4294967295"),
        ("domain: d\ndescriptors:\n  - key: k\n    colour: blue\n", "descriptors[0].colour: unknown key"),
        ("domain: d\ndescriptors:\n  - value: v\n", "descriptors[0].key: expected a non-empty string"),
        ("descriptors: []\n", "domain: expected a non-empty string"),
        ("domain: d\ndescriptors:\n  - key: k\n  - key: k\n", "a second descriptor for key 'k'"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unlimited: true, unit: second}\n",
         "an unlimited limit takes no unit"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
         "    rate_limits: [{unit: second, requests_per_unit: 1}]\n", "either rate_limit or rate_limits"),
        ("domain: d\ndescriptors:\n  - key: k\n    shadow_mode: yes please\n", "shadow_mode: expected true or false"),
        ("domain: [d\n", "not valid YAML"),
        ("domain: d\ndescriptors:\n  - key: k\n    rate_limit: {unit: second, requests_per_unit: 1}\n"
         "    rate_limit: {unit: second, requests_per_unit: 9}\n", "duplicate key 'rate_limit'"),
    ],
)  # fmt: skip
def test_bad_configuration_names_file_place_and_reason(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, Path("limits/bad.yaml"))
    assert str(caught.value).startswith("limits/bad.yaml: ")
    assert message in str(caught.value)


UPSTREAM_KEYS = """
domain: upstream
descriptors:
  - key: remote_address
    detailed_metric: true
    value_to_metric: true
    share_threshold: true
    quota_mode: true
    metadata: {team: edge}
    rate_limit: {unit: second, requests_per_unit: 10}
  - key: blocked
    rate_limit: {unit: second, requests_per_unit: 0}
"""


def test_upstream_keys_are_taken_and_named_as_not_implemented(caplog: pytest.LogCaptureFixture) -> None:
    # Seven of ten of envoyproxy/ratelimit's own example files stopped the service at start.
    domain = parse(UPSTREAM_KEYS, Path("upstream.yaml"))
    rule = domain.match([("remote_address", "10.0.0.1")])
    assert rule is not None and rule.limits[0].requests_per_unit == 10
    blocked = domain.match([("blocked", "x")])
    assert blocked is not None and blocked.limits[0].requests_per_unit == 0  # upstream's block list
    warned = " ".join(r.getMessage() for r in caplog.records)
    for key in ("detailed_metric", "value_to_metric", "share_threshold", "quota_mode", "metadata"):
        assert f"descriptors[0].{key}: accepted but not implemented" in warned


def test_several_files_and_domains(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("domain: a\ndescriptors: []\n")
    (tmp_path / "b.yml").write_text("domain: b\ndescriptors: []\n")
    (tmp_path / "notes.txt").write_text("not a configuration")
    assert sorted(load([tmp_path]).domains) == ["a", "b"]
    (tmp_path / "c.yaml").write_text("domain: a\ndescriptors: []\n")
    with pytest.raises(ConfigError, match="domain 'a' is already defined in"):
        load([tmp_path])
    with pytest.raises(ConfigError, match="no such file or folder"):
        load([tmp_path / "missing"])


def test_files_that_are_not_utf8_or_nest_too_deeply_are_configuration_errors(tmp_path: Path) -> None:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("domain: d\ndescriptors:\n  - key: k\n    value: café\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin1.yaml: not UTF-8 text"):
        load([latin1])
    deep = "domain: d\ndescriptors: " + "[{key: k, descriptors: " * 2000 + "[]" + "}]" * 2000 + "\n"
    with pytest.raises(ConfigError, match="deep.yaml: nested too deeply"):
        parse(deep, tmp_path / "deep.yaml")


async def test_watching_goes_on_after_an_unexpected_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.yaml").write_text("domain: a\ndescriptors: []\n")
    store = ConfigStore([tmp_path])
    calls = 0
    went_on = threading.Event()

    def reload_if_changed() -> bool:  # runs on a thread
        nonlocal calls
        calls += 1
        if calls == 1:
            raise MemoryError("a file far too large")
        went_on.set()
        return False

    monkeypatch.setattr(store, "reload_if_changed", reload_if_changed)
    watching = asyncio.create_task(store.watch(0.001))
    assert await asyncio.to_thread(went_on.wait, 5)
    watching.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watching


@pytest.mark.parametrize("key", ["anonymous", "sk-someone"])
@pytest.mark.parametrize(
    "method", ["/sluice.generation.v1.Generation/CreateConversation", "/grpc.health.v1.Health/Check"]
)
def test_the_shipped_edge_limits_cover_every_method(key: str, method: str) -> None:
    # Only Generate was limited: 300 CreateConversation calls at once wrote 300 rows.
    shipped = load([Path(__file__).parents[3] / "config" / "ratelimit"]).domains["sluice-edge"]
    rule = shipped.match([("api_key", key), ("method", method)])
    assert rule is not None and rule.limits

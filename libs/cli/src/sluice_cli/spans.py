"""The local stack's trace file: spans as JSON lines, written by its trace sink, read by ``sluice trace``.

Past its size limit the sink moves the file aside (``rotated``) and begins a
new one, so a trace is looked up in both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, line: str) -> Span:
        return cls(**json.loads(line))


def rotated(path: Path) -> Path:
    """Where the sink moves a full file."""
    return path.with_suffix(".1" + path.suffix)


def read_spans(path: Path, trace_id: str) -> list[Span]:
    """The spans of one trace, from the file and the one moved aside before it."""
    found = []
    for part in (rotated(path), path):
        if part.is_file():
            with part.open() as lines:
                found += [span for line in lines if (span := Span.from_json(line)).trace_id == trace_id]
    return found

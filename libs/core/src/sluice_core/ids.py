"""Ids the services hand out (tenants, keys, conversations): UUIDs, in one spelling."""

from __future__ import annotations

import re
import uuid

_UUID = re.compile(r"[0-9a-fA-F]{8}(-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}")

MALFORMED = "must be an id (a UUID, 32 hex digits with or without hyphens)"


def canonical_id(value: str) -> str | None:
    """``value`` lowercase and hyphenated (ids are cache keys: two spellings of one id must agree), or
    None if it is no id."""
    return str(uuid.UUID(value)) if _UUID.fullmatch(value) else None

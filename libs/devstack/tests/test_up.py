"""What `sluice up` prints about the stack it started."""

from __future__ import annotations

from sluice_devstack.up import shown


def test_a_stores_password_is_not_printed() -> None:
    assert shown("postgresql://sluice:secret@db:5432/sluice") == "postgresql://sluice:***@db:5432/sluice"
    assert shown("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"

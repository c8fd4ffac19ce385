"""Chat messages, checked the same way by every API that takes them."""

from __future__ import annotations

from collections.abc import Sequence

from sluice.common.v1 import common_pb2
from sluice_core.errors import FieldViolation

ROLE_NAMES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
}
_ROLES = "ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT"

# The most messages one request may carry: checking and rendering them is work on a replica's
# event loop (400,000 empty messages held every other stream of one for 4 s).
MAX_MESSAGES = 4096
# What a chat template adds around each message at the least (role markers, separators): many
# short messages make a long input.
TEMPLATE_CHARS_PER_MESSAGE = 16


def validate_messages(
    messages: Sequence[common_pb2.ChatMessage], out: list[FieldViolation], most: int = MAX_MESSAGES
) -> bool:
    """Whether ``messages`` can be rendered, appending a violation to ``out`` for each problem."""
    if not messages:
        out.append(FieldViolation("messages", "must hold at least one message"))
        return False
    if len(messages) > most:
        out.append(FieldViolation("messages", f"at most {most} messages"))
        return False
    ok = True
    for i, message in enumerate(messages):
        # A proto3 enum takes any number: one this version does not know is the caller's mistake.
        if message.role not in ROLE_NAMES:
            problem = "must be set" if message.role == common_pb2.ROLE_UNSPECIFIED else f"unknown role {message.role}"
            out.append(FieldViolation(f"messages.messages[{i}].role", f"{problem}: {_ROLES}"))
            ok = False
    if not any(m.content.strip() for m in messages):
        out.append(FieldViolation("messages", "every message is empty"))
        ok = False
    return ok

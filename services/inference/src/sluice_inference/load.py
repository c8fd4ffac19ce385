"""What a replica reports about itself: the model it serves and how busy it is."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """The loaded model, for ``GetModelInfo`` and for validating requests."""

    name: str
    max_model_len: int
    vocab_size: int
    dtype: str
    slots: int
    quantization: str
    prefix_caching: bool


class Load:
    """Requests in this replica, counted at the gRPC layer so a cancel shows at once, plus KV-cache use."""

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.kv_cache_usage = 0.0

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


class Admission:
    """One request's place in the load: waiting until its first token, running until it ends."""

    def __init__(self, load: Load) -> None:
        self._load = load
        self.running = False
        self._ended = False
        load.waiting += 1

    def start(self) -> None:
        """Its first token came: from waiting to running."""
        if not self.running and not self._ended:
            self.running = True
            self._load.waiting -= 1
            self._load.running += 1

    def end(self) -> None:
        """It no longer occupies the engine; later calls change nothing."""
        if not self._ended:
            self._ended = True
            if self.running:
                self._load.running -= 1
            else:
                self._load.waiting -= 1

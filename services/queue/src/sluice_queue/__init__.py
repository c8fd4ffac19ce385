"""The public ``sluice.generation.v1.Generation`` API: admission, queueing, relaying token streams."""

SERVICE_NAME = "sluice.generation.v1.Generation"

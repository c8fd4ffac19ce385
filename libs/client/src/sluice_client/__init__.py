"""Async client for sluice's public Generation API."""

from sluice_client.client import GenerationClient, GenerationStream, StreamError

__all__ = ["GenerationClient", "GenerationStream", "StreamError"]

"""The HTTP/SSE stacks an OpenAI-compatible front could use, measured: ``python -m sluice_devstack.http_bench``."""

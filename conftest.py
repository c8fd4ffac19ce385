"""Session-wide test set-up shared by every package's tests."""

from __future__ import annotations

from sluice_core.telemetry import setup_tracing

# Instrument gRPC once, as every service's main does, so that in-process
# servers in the tests run with the same interceptors (and trace ids) as in
# production. Nothing is exported: there is no OTLP endpoint.
setup_tracing("sluice-tests", "tests", otlp_endpoint=None)

"""OpenAI's HTTP API in front of sluice: every OpenAI client and benchmark works with sluice unchanged.

Each HTTP request becomes one call to the public ``Generation`` API (through
Envoy's internal listener, as the ``openai`` identity) with the caller's own
API key: the queue authenticates, queues, budgets and bills it exactly as a
gRPC caller's. This service holds no keys and no state.
"""

"""Model serving: one preloaded, warmed vLLM engine behind the streaming ``sluice.inference.v1`` API."""

SERVICE_NAME = "sluice.inference.v1.Inference"

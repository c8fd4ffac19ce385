"""A simulated GPU engine: vLLM's continuous batching as a timing model, with the model's real tokenizer.

For capacity planning and tests on machines without a GPU; chosen with
``SLUICE_INFERENCE_ENGINE=simulated``, never by default. The timing model,
its presets and their sources are in docs/simulated-engine.md.
"""

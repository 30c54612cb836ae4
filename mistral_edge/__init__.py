"""mistral-edge: deploy Mistral-architecture models, quantized, with a bounded rolling KV cache."""

__version__ = "0.1.0"

"""loraplex: a multi-LoRA LLM server."""

__version__ = "0.1.0"

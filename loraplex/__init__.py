"""loraplex: a multi-LoRA LLM server."""

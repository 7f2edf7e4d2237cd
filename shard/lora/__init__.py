"""LoRA adapters: PEFT config and weights, the adapter store, and per-batch segment plans."""

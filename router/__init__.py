"""Router: validation, tokenization, adapter resolution, continuous batching and the public APIs (no torch)."""

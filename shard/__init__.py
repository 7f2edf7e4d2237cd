"""Shard worker: model weights, KV cache, adapter store and sampling for one tensor-parallel rank."""

"""Helpers the router and the shard both use; nothing here imports either of them."""

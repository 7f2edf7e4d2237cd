"""``loraplex-bench``: load generator, baselines (transformers, peft) and reports for loraplex."""

"""``dsmoe eval``: perplexity, bits per byte and KL divergence against a baseline, on any backend."""

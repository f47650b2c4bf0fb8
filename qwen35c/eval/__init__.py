"""Quality measurements over text: perplexity, bits per byte, KL divergence against a base run."""

"""The Tritium engine: continuous batching over a paged KV cache, usable offline with no Triton."""

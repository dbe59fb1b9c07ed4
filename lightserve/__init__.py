"""lightserve: a multi-process LLM serving system (TokenAttention KV cache, Efficient Router)."""

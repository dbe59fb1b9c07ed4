"""lightserve: a multi-process LLM serving system (TokenAttention KV cache, Efficient Router)."""

from lightserve.io_struct import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # Imported lazily: `LLM` pulls in torch and transformers, which light tools do not need.
    if name == "LLM":
        from lightserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'lightserve' has no attribute {name!r}")

"""Prefix cache: a radix tree that maps token-key prefixes to the KV slots holding them."""

from lightserve.prefix_cache.radix_tree import Node, PrefixMatch, RadixTree

__all__ = ["Node", "PrefixMatch", "RadixTree"]

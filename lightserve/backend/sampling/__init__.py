"""Vectorised next-token sampling for a running batch (`sampler.py`), with its penalties, its
counter-based random numbers and its scratch memory in modules of their own."""

from lightserve.backend.sampling.penalties import PenaltyState
from lightserve.backend.sampling.rng import mix64, seed_keys, uniforms
from lightserve.backend.sampling.sampler import SampleResult, SamplingBatch, sample, sampling_weights

__all__ = ["PenaltyState", "SampleResult", "SamplingBatch", "mix64", "sample", "sampling_weights", "seed_keys",
           "uniforms"]

"""Logprob: one token's log-probability and rank, as vLLM reports it.

A leaf shared by the sampler, which produces them (lowbit/layers/sampler.py), and the request
outputs and the server, which carry them (lowbit/engine/outputs.py, lowbit/serve/); it imports
nothing, so the layer below the engine can build them without depending on the engine.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# one entry per generated token: {token_id: Logprob} holding the sampled token and the top-k alternatives
SampleLogprobs = list[dict[int, Logprob]]

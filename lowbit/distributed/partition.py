"""Which slice of a decoder each tensor-parallel rank holds: pure integer math, no tensors.

Why uneven splits: vLLM refuses a model whose heads or quantization groups do not divide by the
number of ranks. The default model (9 query heads, 3 KV heads) would then never run at TP=2. We
split at the granularity the math needs instead and accept unequal shares:

* attention by KV-head group: a KV head and the query heads that read it stay together, so
  attention needs no communication (3 KV heads at TP=2 -> 2 + 1 groups, 6 + 3 query heads);
  with more ranks than KV heads, each rank holds one KV head (replicated, as vLLM does) and the
  query heads of that group are split between the ranks sharing it;
* the MLP by `unit`-wide blocks of the intermediate dimension (the quantization group of
  down_proj, so a group's scales and zeros stay with its weights): 1536 / 64 = 24 blocks -> 12 + 12.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError


class ShardingError(LowbitError):
    """A model that cannot be split over the requested number of ranks."""


def balanced(n: int, parts: int) -> list[int]:
    """n items over `parts` shares, the first shares one larger when it does not divide: 9/2 -> [5, 4]."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for s in sizes:
        out.append((start, start + s))
        start += s
    return out


@dataclass(frozen=True)
class ShardPlan:
    """Rank `rank`'s slice of every decoder layer (the same for every layer).

    q_heads / kv_heads: [start, end) of the global head indices this rank computes; every local
    query head h reads local KV head (h - q_heads[0]) // (local q / local kv), as in GQA.
    ffn: [start, end) of the intermediate dimension (gate/up output rows, down_proj input columns).
    max_kv_heads: the most KV heads any rank holds; every rank sizes its KV pool by it so all
    ranks have the same number of blocks (the driver's block manager hands out one set of ids).
    """

    rank: int
    world: int
    head_dim: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]
    max_kv_heads: int

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def q_cols(self) -> tuple[int, int]:
        """Columns of o_proj's input (= rows of q_proj) this rank holds."""
        return self.q_heads[0] * self.head_dim, self.q_heads[1] * self.head_dim

    @property
    def kv_rows(self) -> tuple[int, int]:
        return self.kv_heads[0] * self.head_dim, self.kv_heads[1] * self.head_dim


def head_split(num_heads: int, num_kv_heads: int, world: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """[(q head range, kv head range)] per rank."""
    if num_heads % num_kv_heads:
        raise ShardingError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    if world <= num_kv_heads:
        kv = _ranges(balanced(num_kv_heads, world))
        return [((a * group, b * group), (a, b)) for a, b in kv]
    if world > num_heads:
        raise ShardingError(f"cannot split {num_heads} query heads over {world} ranks (at most one rank per head)")
    out = []
    for kv_head, ranks in enumerate(balanced(world, num_kv_heads)):  # ranks sharing each KV head
        if ranks > group:
            raise ShardingError(f"{world} ranks over {num_kv_heads} KV heads of {group} query heads each: "
                                f"some rank would get no query head")
        for a, b in _ranges(balanced(group, ranks)):
            out.append(((kv_head * group + a, kv_head * group + b), (kv_head, kv_head + 1)))
    return out


def ffn_split(intermediate: int, world: int, unit: int) -> list[tuple[int, int]]:
    """The intermediate dimension in `unit`-wide blocks, balanced over the ranks."""
    if unit <= 0 or intermediate % unit:
        raise ShardingError(f"intermediate size {intermediate} is not a multiple of the split unit {unit}")
    blocks = intermediate // unit
    if blocks < world:
        raise ShardingError(f"{blocks} blocks of {unit} in the MLP cannot be split over {world} ranks")
    return [(a * unit, b * unit) for a, b in _ranges(balanced(blocks, world))]


def ffn_unit(intermediate: int, group_size: int | None) -> int:
    """The MLP split granularity: down_proj's quantization group when it has real groups, else 64
    (then fp and group-64 checkpoints split identically), else 8, else 1."""
    if group_size is not None and group_size < intermediate and intermediate % group_size == 0:
        return group_size
    for unit in (64, 8, 1):
        if intermediate % unit == 0:
            return unit
    return 1


def make_plan(rank: int, world: int, *, num_heads: int, num_kv_heads: int, head_dim: int,
              intermediate: int, unit: int) -> ShardPlan:
    if not 0 <= rank < world:
        raise ShardingError(f"rank {rank} outside a world of {world}")
    heads = head_split(num_heads, num_kv_heads, world)
    ffn = ffn_split(intermediate, world, unit)
    q, kv = heads[rank]
    return ShardPlan(rank, world, head_dim, q, kv, ffn[rank], max(b - a for _, (a, b) in heads))

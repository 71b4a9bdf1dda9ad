"""Layout and storage facts of the compressed forms, below everything that reads them (configs, algorithms, modules,
serialization): the base-spec grammar of quantized / 2:4 bases, the 2:4 pattern check, and the shared-channel
storage rules. The packed int layout itself is `lowrank_ops.quant_format`.

Base specs (`parse_base_spec`):

    [gptq-]int{2,3,4,8}[-g<group_size>][-sym]     e.g. "int4-g128", "int3-g128", "int8-g128", "gptq-int4-g128",
                                                 "gptq-int4" (group 128 by default), "int4-g32-sym"
    2:4-magnitude | 2:4-wanda                    2:4 semi-structured pruning, stored dense

Shared channels (SWSC, `lowrank_ops.algorithms.swsc`): a layer W (m, n) stores a codebook C and an int32 index l:
rows shared, C (K, n), l (m,), W ~= C[l]; columns shared, C (m, K), l (n,), W ~= C[:, l]; plus residual factors
r (m + n). Its storage is K x (n or m) values + (m or n) index entries + r (m + n) values (`storage_bits`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lowrank_ops.options import SharedDim
from lowrank_ops.quant_format import check_format_args

# ---------------------------------------------------------------------------------------------- base specs

DEFAULT_GROUP_SIZE = 128
_QUANT_SPEC = re.compile(r"^(?:(?P<algo>gptq)-)?int(?P<bits>\d+)(?:-g(?P<group>\d+))?(?P<sym>-sym)?$")
_PRUNE_SPEC = re.compile(r"^2:4-(?P<method>magnitude|wanda)$")
SPEC_GRAMMAR = "'[gptq-]int{2,3,4,8}[-g<group_size>][-sym]' or '2:4-magnitude' / '2:4-wanda'"


@dataclass(frozen=True)
class BaseSpec:
    """A parsed base spec. kind "quant": bits, group_size, algorithm ("rtn" | "gptq"), symmetric;
    kind "prune": prune_method ("magnitude" | "wanda")."""

    spec: str
    kind: str
    bits: int | None = None
    group_size: int | None = None
    algorithm: str | None = None
    symmetric: bool = False
    prune_method: str | None = None

    @property
    def needs_gram(self) -> bool:
        """Whether building the base needs the calibration Gram (GPTQ's Hessian, Wanda's input norms)."""
        return self.algorithm == "gptq" or self.prune_method == "wanda"


def parse_base_spec(spec: str) -> BaseSpec:
    """Parse a base spec (module docstring); ValueError naming the spec and the grammar when it is malformed."""
    where = "parse_base_spec"
    if not isinstance(spec, str):
        raise TypeError(f"{where}: base spec must be a string like 'int4-g128', got {type(spec).__name__} {spec!r}")
    text = spec.strip().lower()
    match = _PRUNE_SPEC.match(text)
    if match:
        return BaseSpec(spec, "prune", prune_method=match["method"])
    match = _QUANT_SPEC.match(text)
    if not match:
        raise ValueError(f"{where}: base spec {spec!r} is not of the form {SPEC_GRAMMAR}")
    bits = int(match["bits"])
    group_size = DEFAULT_GROUP_SIZE if match["group"] is None else int(match["group"])
    try:
        check_format_args(f"{where}({spec!r})", bits, group_size)
    except (TypeError, ValueError) as exc:
        raise ValueError(str(exc)) from None
    return BaseSpec(spec, "quant", bits=bits, group_size=group_size, algorithm=match["algo"] or "rtn",
                    symmetric=match["sym"] is not None)  # fmt: skip


# ---------------------------------------------------------------------------------------------- 2:4 pattern


def two_of_four_violation(W: torch.Tensor) -> tuple[int, int, int] | None:
    """The first (row, first column of the run, non-zeros in it) where W (m, n) breaks the 2:4 pattern -- more than
    2 non-zeros in a run of 4 consecutive columns, more than ceil(L / 2) in a tail run of L = n mod 4 -- or None when
    W satisfies it. Entries that happen to be 0 are fine (at most, not exactly)."""
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise ValueError(f"two_of_four_violation: W must be a 2-D tensor (m, n), got {tuple(getattr(W, 'shape', ()))}")
    m, n = W.shape
    runs = -(-n // 4)
    counts = F.pad(W.detach() != 0, (0, 4 * runs - n)).view(m, runs, 4).sum(dim=-1)
    allowed = torch.full((runs,), 2, device=W.device)
    allowed[-1] = (n - 4 * (runs - 1) + 1) // 2
    bad = (counts > allowed).nonzero()
    if bad.shape[0] == 0:
        return None
    row, run = bad[0].tolist()
    return row, 4 * run, int(counts[row, run])


# ---------------------------------------------------------------------------------------------- shared channels

INDEX_BITS = 32
"""Stored index width: the kernels gather with int32 indices (a ceil(log2 K)-bit packed index would save
(32 - ceil(log2 K)) / n bits per weight, under 0.05 at n = 576)."""


def check_shared(shared, where: str) -> SharedDim:
    return SharedDim.parse(shared, where, "shared")


def channel_count(m: int, n: int, shared: str) -> int:
    """Number of channels that share the codebook: m output rows, or n input columns."""
    return m if shared == SharedDim.rows else n


def storage_bits(m: int, n: int, clusters: int, rank: int, shared: str, value_bits: int = 16) -> int:
    """Bits stored for a (m, n) layer: codebook + index + residual factors (bias excluded)."""
    entry = n if shared == SharedDim.rows else m
    return value_bits * (clusters * entry + rank * (m + n)) + INDEX_BITS * channel_count(m, n, shared)


def bits_per_weight(m: int, n: int, clusters: int, rank: int, shared: str, value_bits: int = 16) -> float:
    return storage_bits(m, n, clusters, rank, shared, value_bits) / (m * n)


def clusters_for_bits(m: int, n: int, bits: float, rank: int, shared: str, value_bits: int = 16,
                      where: str = "clusters_for_bits") -> int:  # fmt: skip
    """The largest K whose storage fits `bits` per weight of the (m, n) layer with a rank-`rank` residual, capped
    at the number of channels. Raises when not even K = 1 fits (the residual or the index alone is over budget)."""
    entry = n if shared == SharedDim.rows else m
    budget = bits * m * n - INDEX_BITS * channel_count(m, n, shared) - value_bits * rank * (m + n)
    clusters = min(math.floor(budget / (value_bits * entry)), channel_count(m, n, shared))
    if clusters < 1:
        floor = bits_per_weight(m, n, 1, rank, shared, value_bits)
        raise ValueError(
            f"{where}: {bits} bits per weight cannot hold one cluster plus a rank-{rank} residual for a ({m}, {n}) "
            f"layer (that needs {floor:.3f}); lower the rank or raise the bits"
        )
    return clusters


def check_clusters(clusters, m: int, n: int, shared: str, where: str) -> int:
    if isinstance(clusters, bool) or not isinstance(clusters, int) or clusters < 1:
        raise ValueError(f"{where}: clusters={clusters!r} must be an int >= 1")
    channels = channel_count(m, n, shared)
    if clusters > channels:
        raise ValueError(
            f"{where}: clusters={clusters} is larger than the {channels} {shared} of a ({m}, {n}) weight "
            f"(shared={shared!r}); use at most {channels}"
        )
    return clusters


def shared_weight(codebook: torch.Tensor, index: torch.Tensor, shared: str) -> torch.Tensor:
    """W_shared (m, n): codebook rows gathered by index (rows), or codebook columns (columns)."""
    check_shared(shared, "shared_weight")
    index = index.to(torch.int64)
    return codebook.index_select(0, index) if shared == SharedDim.rows else codebook.index_select(1, index)

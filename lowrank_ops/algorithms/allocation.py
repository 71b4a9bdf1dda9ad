"""Rank allocation: per-layer ranks whose parameters sum to a target fraction of the targeted weights.

Budget: sum_l cost_l <= ratio * sum_l m_l n_l, where cost_l = r_l (m_l + n_l) for a factored layer and
m_l n_l for a layer kept dense (rank None). Ranks are multiples of `align`; a layer whose rank would
reach the break-even rank m n / (m + n) stays dense (it would not save parameters).

- `allocate_uniform`: every layer at `ratio` (rank rounded down to `align`).
- `allocate_by_loss`: minimise sum_l E_l(r_l) / E_l(0), the fraction of each layer's (whitened) energy that
  is discarded, E_l(r) = sum_{i >= r} sigma_{l,i}^2, under the budget. The marginal gain of each next
  block of `align` singular values decreases with r (sigma sorted), so a greedy by gain per parameter is
  optimal on the aligned grid; the last step of a layer may be "go dense", which gains the rest.
- `allocate_by_sensitivity`: ASVD's search. `table[l][rho]` = calibration perplexity with layer l alone at
  param ratio rho. For a threshold tau, each layer takes the smallest candidate rho with perplexity <= tau
  (dense if none); the smallest tau whose total fits the budget is found by bisection over the table's
  values (the total cost is monotone in tau).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Mapping, Sequence

import torch

from lowrank_ops.rank import break_even_rank, rank_for_param_ratio

Shape = tuple[int, int]


def _check_ratio(ratio: float, where: str) -> None:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"{where}: ratio={ratio} must be in (0, 1] (fraction of parameters kept)")


def max_factored_rank(m: int, n: int, align: int) -> int:
    """Largest multiple of `align` strictly below the break-even rank (0 if none)."""
    r_star = break_even_rank(m, n)
    r = int(r_star) // align * align
    return r - align if r >= r_star else r


def layer_cost(m: int, n: int, rank: int | None) -> int:
    """Parameters stored for an (m, n) layer at `rank` (None = dense)."""
    return m * n if rank is None else rank * (m + n)


def allocate_uniform(shapes: Sequence[Shape], ratio: float, align: int = 16) -> list[int | None]:
    _check_ratio(ratio, "allocate_uniform")
    ranks: list[int | None] = []
    for m, n in shapes:
        rank = rank_for_param_ratio(m, n, ratio, align)
        ranks.append(None if ratio >= 1.0 or rank >= break_even_rank(m, n) else rank)
    return ranks


def allocate_by_loss(
    shapes: Sequence[Shape], energies: Sequence[torch.Tensor], ratio: float, align: int = 16, relative: bool = True
) -> list[int | None]:
    """Greedy global allocation on discarded energy; `energies[l]` = sigma_l^2 in descending order.

    relative=True minimises sum_l E_l(r_l) / E_l(0) (every layer's fraction counts alike); relative=False
    minimises sum_l E_l(r_l), the absolute calibration output error of the whitened layers."""
    _check_ratio(ratio, "allocate_by_loss")
    if len(shapes) != len(energies):
        raise ValueError(f"allocate_by_loss: {len(shapes)} shapes but {len(energies)} energy vectors")
    budget = ratio * sum(m * n for m, n in shapes)
    ranks: list[int | None] = []
    tails: list[torch.Tensor] = []  # tails[l][r] = E_l(r) / E_l(0), r = 0..len
    spent = 0.0
    for (m, n), energy in zip(shapes, energies, strict=True):
        energy = energy.detach().double().cpu().clamp_min(0)
        total = energy.sum().clamp_min(1e-300) if relative else 1.0
        tails.append(torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)]) / total)
        start = min(align, min(m, n))
        ranks.append(start)
        spent += layer_cost(m, n, start)
    if spent > budget:
        raise ValueError(
            f"allocate_by_loss: ratio={ratio} is below the minimum of one aligned block (rank {align}) per layer "
            f"({spent / sum(m * n for m, n in shapes):.4f} of the parameters)"
        )

    def next_step(layer: int):
        """(-gain per parameter, layer, new rank or None for dense, extra cost) of layer's next step."""
        (m, n), rank, tail = shapes[layer], ranks[layer], tails[layer]
        if rank is None:
            return None
        r_max = max_factored_rank(m, n, align)
        if rank + align <= r_max:
            gain, new_rank, cost = (tail[rank] - tail[rank + align]).item(), rank + align, align * (m + n)
        else:
            gain, new_rank, cost = tail[rank].item(), None, m * n - rank * (m + n)
        return (-gain / cost, layer, new_rank, cost)

    heap = [step for layer in range(len(shapes)) if (step := next_step(layer)) is not None]
    heapq.heapify(heap)
    while heap:
        _, layer, new_rank, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this layer's next step does not fit; smaller steps of other layers still may
        spent += cost
        ranks[layer] = new_rank
        if (step := next_step(layer)) is not None:
            heapq.heappush(heap, step)
    return ranks


def allocate_by_sensitivity(
    shapes: Sequence[Shape], table: Sequence[Mapping[float, float]], ratio: float, align: int = 16
) -> list[int | None]:
    """ASVD threshold search over `table[l]` = {candidate ratio: calibration perplexity}."""
    _check_ratio(ratio, "allocate_by_sensitivity")
    if len(shapes) != len(table):
        raise ValueError(f"allocate_by_sensitivity: {len(shapes)} shapes but {len(table)} table rows")
    budget = ratio * sum(m * n for m, n in shapes)

    def ranks_at(tau: float) -> list[int | None]:
        out: list[int | None] = []
        for (m, n), row in zip(shapes, table, strict=True):
            ok = sorted(rho for rho, ppl in row.items() if ppl <= tau)
            out.extend(allocate_uniform([(m, n)], ok[0], align) if ok else [None])
        return out

    def cost(ranks) -> int:
        return sum(layer_cost(m, n, r) for (m, n), r in zip(shapes, ranks, strict=True))

    taus = sorted({ppl for row in table for ppl in row.values()})
    # cost(ranks_at(tau)) only decreases as tau grows: bisect for the first tau that fits the budget.
    index = bisect.bisect_left(range(len(taus)), True, key=lambda i: cost(ranks_at(taus[i])) <= budget)
    if index == len(taus):
        kept = cost(ranks_at(taus[-1])) / (budget / ratio)
        raise ValueError(
            f"allocate_by_sensitivity: even the smallest candidate ratios keep {kept:.4f} of the parameters, "
            f"above ratio={ratio}; add smaller sensitivity_ratios"
        )
    return ranks_at(taus[index])

"""Pieces the low-rank methods share (`methods.lowrank`, `methods.basis`): factor one layer with the engine's
whitened SVD, build its LowRankLinear, and select individual bases by score under a global budget.

Selection by score (the "fisher" allocator and basis selection; the math is `algorithms.basis_selection`):
1. factor every target at FULL rank (W = sum_i s_i u_i v_i^T with s = 1) and swap in a LowRankLinear with
   coefficients s: the model still computes W x up to rounding;
2. score every basis: target output energy from the Gram, or |s dL/ds| / (s dL/ds)^2 from forward + backward passes
   with only s requiring gradients; the original layers are put back afterwards, whatever happens;
3. select under the global budget (`select_bases`: aligned ranks; a layer that would reach break-even stays dense).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.algorithms.basis_selection import GradientScores, energy_scores, select_bases
from lowrank_ops.algorithms.lowrank import whitening_for
from lowrank_ops.compress.report import LayerResult
from lowrank_ops.engine import WhitenedSVD, whitened_svd
from lowrank_ops.modules import LowRankLinear
from lowrank_ops.options import BasisScore
from lowrank_ops.surgery import linear_weight


def factor_layer(run, module: nn.Module, stats, method: str, alpha: float) -> WhitenedSVD:
    """Full-rank folded factors of one layer (`engine.whitened_svd` with the S of `method`) on the run's device;
    truncating them to [:, :r] / [:r] gives the factors of any rank r."""
    weight = linear_weight(module).detach().to(run.device, torch.float32)
    n = weight.shape[1]
    whitening = run.whitening(f"lowrank-{method}-{alpha}", stats, n,
                              lambda: whitening_for(method, stats, n, alpha, run.device))  # fmt: skip
    return whitened_svd(weight, whitening, rank=min(weight.shape))


def lowrank_module(original: nn.Module, factors: WhitenedSVD, rank: int) -> LowRankLinear:
    """The LowRankLinear of `original` from the leading `rank` bases of its folded factors (bias copied)."""
    weight = linear_weight(original)
    m, n = weight.shape
    module = LowRankLinear(n, m, rank, bias=original.bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        module.u.copy_(factors.U[:, :rank])
        module.v.copy_(factors.V[:rank])
        if original.bias is not None:
            module.bias.copy_(original.bias.detach())
    module.dense_class = type(original).__name__
    return module


@dataclass
class BasisLayerResult(LayerResult):
    """LayerResult of a layer whose bases were selected by score. rank = kept + new bases; discarded_energy =
    1 - spectrum_kept.

    kept_bases: bases of the full-rank decomposition kept; new_bases: new (residual) bases appended;
    spectrum_kept: fraction of the decomposition's spectrum energy sum_i sigma_i^2 that the kept bases carry (the
        fraction of each layer's spectrum that survives; 1.0 for a dense layer);
    kept_beyond_leading: kept bases that truncation to the same rank would have dropped (singular-value index >= the
        kept count): how far the selection departs from plain truncation."""

    kept_bases: int = 0
    new_bases: int = 0
    spectrum_kept: float = 1.0
    kept_beyond_leading: int = 0


@dataclass
class BasisPlan:
    """A selection: each layer's rank (None: stays dense) and, when made on these very factors, which bases
    (`kept`), the full-rank modules they index (`full`) and their spectra."""

    ranks: dict[str, int | None]
    kept: dict[str, torch.Tensor] = field(default_factory=dict)
    full: dict[str, LowRankLinear] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)

    def ranks_only(self) -> BasisPlan:
        return BasisPlan(dict(self.ranks))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a batch of windows (B, L), log-softmax in float32 at least (the evaluation protocol's
    loss; a float64 model keeps float64)."""
    logits = model(input_ids=ids, use_cache=False).logits
    logits = logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), ids[:, 1:].flatten())


class OnlyTraining:
    """Context: every model parameter frozen except `trainable`; flags restored on exit."""

    def __init__(self, model: nn.Module, trainable: list[nn.Parameter]):
        self.model, self.trainable = model, trainable

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.trainable:
            p.requires_grad_(True)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        return False


def _gradient_scores(model, modules: dict[str, LowRankLinear], windows, kind, device, progress):
    """Scores from one backward pass per window: every window is one sample of the per-batch gradient, so "fisher"
    averages as many squared gradients as there are windows."""
    accumulators = {name: GradientScores(module.rank) for name, module in modules.items()}
    coefficients = [module.s for module in modules.values()]
    with OnlyTraining(model, coefficients):
        for batch in tqdm(windows.split(1), desc="basis scores", unit="batch", disable=not progress):
            grads = torch.autograd.grad(lm_loss(model, batch.to(device)), coefficients)
            for (name, module), grad in zip(modules.items(), grads, strict=True):
                accumulators[name].update(module.s, grad)
    return {name: acc.score(kind) for name, acc in accumulators.items()}


def select_by_score(run, targets: dict[str, nn.Module], stats: dict, *, basis: str, alpha: float, score: str,
                    ratio: float, align: int, score_tokens: int) -> BasisPlan:  # fmt: skip
    """Steps 1-3 of the module docstring over `targets`; the model is left as it was."""
    names = list(targets)
    spectra, full = {}, {}
    try:
        with run.timed("full-rank factors"):
            for name in tqdm(names, desc="full-rank factors", unit="layer", disable=not run.progress):
                original = targets[name]
                factors = factor_layer(run, original, stats.get(name), basis, alpha)
                spectra[name] = factors.singular_values.detach().double().cpu()
                module = lowrank_module(original, factors, min(linear_weight(original).shape)).add_coefficients()
                run.replace(name, module)
                full[name] = module
        with run.timed("scores"):
            if score == BasisScore.energy:
                scores = {name: energy_scores(full[name].u, full[name].v, stats[name].gram, full[name].s)
                          for name in names}  # fmt: skip
            else:
                windows = run.windows[: max(1, score_tokens // run.windows.shape[1])]
                scores = _gradient_scores(run.model, full, windows, score, run.model_device, run.progress)
    finally:
        for name in full:  # the originals go back; `fit` swaps in what was selected
            run.replace(name, targets[name])
    shapes = [tuple(linear_weight(targets[name]).shape) for name in names]
    selection = select_bases(shapes, [scores[name] for name in names], ratio, align,
                             relative=score == BasisScore.energy)  # fmt: skip
    return BasisPlan(dict(zip(names, selection.ranks, strict=True)), dict(zip(names, selection.kept, strict=True)),
                     full, spectra)  # fmt: skip


def selected_module(plan: BasisPlan, name: str) -> LowRankLinear:
    """The LowRankLinear holding the bases `plan` kept of layer `name`, with their coefficients s (not folded)."""
    module, kept, rank = plan.full[name], plan.kept[name], plan.ranks[name]
    m, n = module.out_features, module.in_features
    pruned = LowRankLinear(n, m, rank, bias=module.bias is not None, dtype=module.u.dtype, device=module.u.device)
    with torch.no_grad():
        pruned.u.copy_(module.u[:, kept])
        pruned.v.copy_(module.v[kept])
        if module.bias is not None:
            pruned.bias.copy_(module.bias)
    pruned.add_coefficients(module.s.detach()[kept])
    pruned.dense_class = module.dense_class
    return pruned


def selection_result(plan: BasisPlan, name: str, new_bases: int = 0) -> BasisLayerResult:
    """The report row of a layer selected by `plan` (kept bases, spectrum kept, bases beyond the leading ones)."""
    module, rank = plan.full[name], plan.ranks[name]
    m, n = module.out_features, module.in_features
    sigma2 = plan.spectra[name].square()
    kept = plan.kept[name].cpu()
    fraction = float(sigma2[kept].sum() / sigma2.sum().clamp_min(1e-300))
    total = rank + new_bases
    return BasisLayerResult(name, m, n, total, total * (m + n), 1.0 - fraction, kept_bases=rank, new_bases=new_bases,
                            spectrum_kept=fraction, kept_beyond_leading=int((kept >= rank).sum()))  # fmt: skip

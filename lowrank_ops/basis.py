"""`compress_basis_(model, BasisConfig, calibration, train=, heldout=)`: application-specific basis selection.

`compress_(model, BasisConfig(...), calibration, train=..., heldout=...)` dispatches here. The calibration windows are
TARGET-application text (e.g. Python source for a code model). Pipeline, reusing compress_'s pieces:

1. find targets (surgery); calibrate on the target windows (`collect_input_statistics`: Gram when the basis is
   "whiten", the score is "energy" or new bases are added; mean |x| otherwise);
2. factor every target at FULL rank with compress_'s `_LayerFactorer` (the engine's whitened SVD with the basis'
   S) and swap in a full-rank LowRankLinear with coefficients s = 1 (`LowRankLinear.add_coefficients`): the model
   still computes W x up to rounding;
3. score every basis (`algorithms.basis_selection`): target output energy from the Gram, or |s dL/ds| /
   (s dL/ds)^2 from `score_tokens` tokens of forward + backward passes with only s requiring gradients;
4. select under the global budget (`select_bases` = `allocate_by_loss` on sorted scores; aligned ranks; a layer
   whose kept rank would reach break-even stays dense, i.e. the original module is put back);
5. optionally append `new_rank` new bases per factored layer fitted to the target residual (EoRA, engine);
6. optionally re-learn s (and the new bases' factors; the kept U, V stay frozen) for `train_steps` Adam steps on
   `train` windows with early stopping on `heldout` windows (the best held-out state is kept);
7. fold s into U (`fold_coefficients`): the saved model holds plain LowRankLinear modules, so save_compressed /
   load_compressed and the fused kernels work unchanged.

Why the default basis is "whiten" rather than the paper's plain SVD: selection can only keep or drop bases, so
the quality ceiling is set by how well the basis concentrates the target output in few components; the whitened
basis is optimal for the target output error of the layer (Eckart-Young in the G-norm), plain SVD bases are not.
All three bases are available (`BasisConfig.basis`), and the benchmark reports what the choice costs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.algorithms.basis_selection import (
    GradientScores,
    energy_scores,
    new_bases,
    new_basis_count,
    select_bases,
    selection_ratio,
)
from lowrank_ops.calibration import calibration_windows, collect_input_statistics
from lowrank_ops.compress import CompressionReport, LayerResult, _LayerFactorer, _lowrank_module, resolve_device
from lowrank_ops.configs import BasisConfig, LowRankConfig
from lowrank_ops.modules import LowRankLinear
from lowrank_ops.surgery import embedding_parameter_count, find_targets, linear_weight, replace_module


@dataclass
class BasisLayerResult(LayerResult):
    """LayerResult of basis selection. rank = kept + new bases; discarded_energy = 1 - spectrum_kept.

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
class BasisReport(CompressionReport):
    """CompressionReport plus the re-learning history (empty when train_steps = 0)."""

    training: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "training": self.training}


def _check_windows(windows, name: str, where: str = "compress_basis_") -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.long or windows.dim() != 2:
        raise ValueError(f"{where}: {name} must be a LongTensor of token ids shaped (N, seq_len), got "
                         f"{type(windows).__name__} {tuple(getattr(windows, 'shape', ()))}")  # fmt: skip
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"{where}: {name}.shape={tuple(windows.shape)} needs at least one window of >= 2 tokens")
    return windows


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a batch of windows (B, L), log-softmax in float32 at least (the evaluation protocol's
    loss; a float64 model keeps float64)."""
    logits = model(input_ids=ids, use_cache=False).logits
    logits = logits[:, :-1].flatten(0, 1)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), ids[:, 1:].flatten())


class _OnlyTraining:
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


def _gradient_scores(model, modules: dict[str, LowRankLinear], windows, batch_size, kind, device, progress):
    """Scores from one backward pass per batch of `batch_size` windows (compress_basis_ uses 1: every window is one
    sample of the per-batch gradient, so "fisher" averages as many squared gradients as there are windows)."""
    accumulators = {name: GradientScores(module.rank) for name, module in modules.items()}
    coefficients = [module.s for module in modules.values()]
    with _OnlyTraining(model, coefficients):
        for batch in tqdm(windows.split(batch_size), desc="basis scores", unit="batch", disable=not progress):
            grads = torch.autograd.grad(lm_loss(model, batch.to(device)), coefficients)
            for (name, module), grad in zip(modules.items(), grads, strict=True):
                accumulators[name].update(module.s, grad)
    return {name: acc.score(kind) for name, acc in accumulators.items()}


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, device) -> float:
    """Mean next-token NLL over `windows`, every window weighted alike."""
    total = 0.0
    for batch in windows.split(batch_size):
        total += lm_loss(model, batch.to(device)).item() * batch.shape[0]
    return total / windows.shape[0]


def relearn_coefficients(
    model: nn.Module,
    modules: dict[str, LowRankLinear],
    new_counts: dict[str, int],
    train: torch.Tensor,
    heldout: torch.Tensor,
    config: BasisConfig,
    device: torch.device,
    progress: bool = True,
) -> dict:
    """Adam on every module's s and on the factors of its last new_counts[name] bases (older columns of U / rows of V
    get zero gradient, so Adam leaves them exactly unchanged); batches of config.batch_size windows drawn from `train`
    in an order fixed by config.seed; held-out loss at step 0, every config.eval_every steps and at the end; stops
    after config.patience evaluations without improvement and restores the best state. Returns the history."""
    groups = [{"params": [m.s for m in modules.values()], "lr": config.lr}]
    masked: list[tuple[nn.Parameter, int, int]] = []  # (factor, dim, first trainable index)
    for name, module in modules.items():
        k = new_counts.get(name, 0)
        if k == 0:
            continue
        start = module.rank - k
        for factor, dim in ((module.u, 1), (module.v, 0)):
            rms = factor.detach().narrow(dim, start, k).float().square().mean().sqrt().item()
            groups.append({"params": [factor], "lr": config.lr * max(rms, 1e-12)})
            masked.append((factor, dim, start))
    trainable = [p for group in groups for p in group["params"]]
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.empty(0, dtype=torch.long)
    history = {"step": [], "heldout_loss": [], "train_loss": []}
    best = (heldout_loss(model, heldout, config.batch_size, device), 0)
    history["step"].append(0)
    history["heldout_loss"].append(best[0])
    history["train_loss"].append(None)
    best_state = [p.detach().clone() for p in trainable]
    since_best, running, count = 0, 0.0, 0
    bar = tqdm(range(1, config.train_steps + 1), desc="re-learning s", unit="step", disable=not progress)
    with _OnlyTraining(model, trainable):
        for step in bar:
            if order.numel() < config.batch_size:
                order = torch.cat([order, torch.randperm(train.shape[0], generator=generator)])
            index, order = order[: config.batch_size], order[config.batch_size :]
            loss = lm_loss(model, train[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for factor, dim, start in masked:
                factor.grad.narrow(dim, 0, start).zero_()
            optimizer.step()
            running, count = running + loss.item(), count + 1
            if step % config.eval_every == 0 or step == config.train_steps:
                value = heldout_loss(model, heldout, config.batch_size, device)
                history["step"].append(step)
                history["heldout_loss"].append(value)
                history["train_loss"].append(running / count)
                running, count = 0.0, 0
                bar.set_postfix(heldout=f"{value:.4f}", best=f"{min(value, best[0]):.4f}")
                if value < best[0]:
                    best, since_best = (value, step), 0
                    best_state = [p.detach().clone() for p in trainable]
                else:
                    since_best += 1
                    if since_best >= config.patience:
                        break
    with torch.no_grad():
        for p, saved in zip(trainable, best_state, strict=True):
            p.copy_(saved)
    history.update(best_step=best[1], best_heldout_loss=best[0], initial_heldout_loss=history["heldout_loss"][0])
    return history


def compress_basis_(
    model: nn.Module,
    config: BasisConfig,
    calibration: torch.Tensor | None = None,
    *,
    train: torch.Tensor | None = None,
    heldout: torch.Tensor | None = None,
    progress: bool = True,
) -> BasisReport:
    """Replace the targeted Linear layers of `model` in place by LowRankLinear modules keeping the bases that matter
    on the target data (module docstring).

    calibration: target token ids (N, seq_len); at most config.calib_tokens tokens are used for the statistics and
        the first config.score_tokens of them for the gradient scores.
    train / heldout: target token ids for re-learning (needed when config.train_steps > 0); keep them disjoint
        from the evaluation text.
    """
    if not isinstance(config, BasisConfig):
        raise TypeError(f"compress_basis_: config must be a BasisConfig, got {type(config).__name__}")
    config.validate()
    windows = calibration_windows(calibration, config.calib_tokens, "BasisConfig (bases are scored on target data)")
    if config.train_steps > 0:
        if train is None or heldout is None:
            raise ValueError(
                f"compress_basis_: train_steps={config.train_steps} needs target windows for training "
                "and early stopping: pass train=... and heldout=... (LongTensors (N, seq_len))"
            )
        train, heldout = _check_windows(train, "train"), _check_windows(heldout, "heldout")
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    targets = find_targets(model, config.targets, config.ignore)
    names = list(targets)
    device = resolve_device(config.device)
    model_device = next(model.parameters()).device
    shapes = [tuple(linear_weight(targets[name]).shape) for name in names]
    ratio = selection_ratio(shapes, config.param_ratio, config.new_rank)  # new bases are paid from the budget

    needs_gram = config.basis == "whiten" or config.score == "energy" or config.new_rank > 0
    stats: dict = {}
    if config.basis != "svd" or needs_gram:
        tic = time.perf_counter()
        stats = collect_input_statistics(model, names, windows, gram=needs_gram, batch_size=config.batch_size,
                                         progress=progress)  # fmt: skip
        seconds["calibration"] = time.perf_counter() - tic

    # 2. full-rank factors, swapped in with s = 1
    tic = time.perf_counter()
    factor_config = LowRankConfig(method=config.basis, alpha=config.alpha, align=config.align, device=config.device,
                                  calib_tokens=config.calib_tokens, seq_len=config.seq_len)  # fmt: skip
    factorer = _LayerFactorer(model, targets, factor_config, stats, device)
    spectra, full = {}, {}
    try:
        for name in tqdm(names, desc="full-rank factors", unit="layer", disable=not progress):
            original = targets[name]
            m, n = linear_weight(original).shape
            factors = factorer.factor(name)
            spectra[name] = factors.singular_values.detach().double().cpu()
            module = _lowrank_module(original, factors, min(m, n)).add_coefficients()
            replace_module(model, name, module)
            full[name] = module
        seconds["factoring"] = time.perf_counter() - tic

        # 3. scores
        tic = time.perf_counter()
        if config.score == "energy":
            scores = {name: energy_scores(full[name].u, full[name].v, stats[name].gram, full[name].s) for name in names}
        else:
            score_windows = windows[: max(1, config.score_tokens // windows.shape[1])]
            scores = _gradient_scores(model, full, score_windows, 1, config.score, model_device,
                                      progress)  # fmt: skip
    except BaseException:
        for name in full:  # leave the model as it was
            replace_module(model, name, targets[name])
        raise
    seconds["scores"] = time.perf_counter() - tic

    # 4. selection under the budget
    selection = select_bases(shapes, [scores[name] for name in names], ratio, config.align,
                             relative=config.score == "energy")  # fmt: skip
    kept_modules: dict[str, LowRankLinear] = {}
    layers: list[BasisLayerResult] = []
    new_counts: dict[str, int] = {}
    tic = time.perf_counter()
    for name, (m, n), rank, kept in zip(names, shapes, selection.ranks, selection.kept, strict=True):
        original = targets[name]
        if rank is None:
            replace_module(model, name, original)
            layers.append(BasisLayerResult(name, m, n, None, m * n, 0.0))
            continue
        module = full[name]
        pruned = LowRankLinear(n, m, rank, bias=module.bias is not None, dtype=module.u.dtype, device=module.u.device)
        with torch.no_grad():
            pruned.u.copy_(module.u[:, kept])
            pruned.v.copy_(module.v[kept])
            if module.bias is not None:
                pruned.bias.copy_(module.bias)
        pruned.add_coefficients(module.s.detach()[kept])
        pruned.dense_class = module.dense_class
        k = new_basis_count((m, n), rank, config.new_rank, config.align)
        if k > 0:
            W = linear_weight(original).detach().to(device, torch.float32)
            W_kept = pruned.to_linear().weight.detach().to(device, torch.float32)
            extra = new_bases(W, W_kept, stats[name], k)
            pruned.append_bases(extra.U, extra.V)
            new_counts[name] = k
        replace_module(model, name, pruned)
        kept_modules[name] = pruned
        sigma2 = spectra[name].square()
        kept_cpu = kept.cpu()
        fraction = float(sigma2[kept_cpu].sum() / sigma2.sum().clamp_min(1e-300))
        beyond = int((kept_cpu >= rank).sum())
        total_rank = rank + k
        layers.append(BasisLayerResult(name, m, n, total_rank, total_rank * (m + n), 1.0 - fraction, kept_bases=rank,
                                       new_bases=k, spectrum_kept=fraction, kept_beyond_leading=beyond))  # fmt: skip
    del full
    seconds["selection"] = time.perf_counter() - tic

    # 6. re-learning
    history: dict = {}
    if config.train_steps > 0 and kept_modules:
        tic = time.perf_counter()
        history = relearn_coefficients(model, kept_modules, new_counts, train, heldout, config, model_device, progress)
        seconds["training"] = time.perf_counter() - tic

    # 7. fold: plain LowRankLinear modules from here on
    for module in kept_modules.values():
        module.fold_coefficients()
    seconds["total"] = time.perf_counter() - start
    return BasisReport(config.to_dict(), layers, embedding_parameter_count(model), seconds, training=history)

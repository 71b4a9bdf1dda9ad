"""BasisConfig: application-specific basis selection -- keep the bases of each layer that matter on target data.

The calibration windows are TARGET-application text (e.g. Python source for a code model).
select: `compress.factoring.select_by_score` (full-rank factors with coefficients s, scores on the target windows,
    one selection under the global budget, new bases paid from it: `selection_ratio`);
fit: the kept bases with their coefficients s, plus `new_rank` new bases fitted to the target residual (EoRA,
    `algorithms.basis_selection.new_bases`);
finish: optionally re-learn s (and the new bases' factors; the kept U, V stay frozen) for `train_steps` Adam steps on
    `train` windows with early stopping on `heldout` windows (the best held-out state is kept), then fold s into U:
    the saved model holds plain LowRankLinear modules, so save / load and the fused kernels work unchanged.

Why the default basis is "whiten" rather than the paper's plain SVD: selection can only keep or drop bases, so the
quality ceiling is set by how well the basis concentrates the target output in few components; the whitened basis is
optimal for the target output error of the layer (Eckart-Young in the G-norm), plain SVD bases are not. All three
bases are available (`BasisConfig.basis`), and the benchmark reports what the choice costs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank_ops.algorithms.basis_selection import new_bases, new_basis_count, selection_ratio
from lowrank_ops.compress.factoring import (
    BasisLayerResult,
    BasisPlan,
    OnlyTraining,
    factor_layer,
    lm_loss,
    lowrank_module,
    select_by_score,
    selected_module,
    selection_result,
)
from lowrank_ops.compress.method import CompressionMethod, StatisticsNeed, register_method
from lowrank_ops.compress.report import CompressionReport, LayerResult
from lowrank_ops.configs import BasisConfig
from lowrank_ops.modules import LowRankLinear
from lowrank_ops.options import BasisScore, Method
from lowrank_ops.rank import discarded_energy
from lowrank_ops.surgery import linear_weight


@dataclass
class BasisReport(CompressionReport):
    """CompressionReport plus the re-learning history (empty when train_steps = 0)."""

    training: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "training": self.training}


def _check_windows(windows, name: str, where: str = "compress_ (BasisConfig)") -> torch.Tensor:
    if not isinstance(windows, torch.Tensor) or windows.dtype != torch.long or windows.dim() != 2:
        raise ValueError(f"{where}: {name} must be a LongTensor of token ids shaped (N, seq_len), got "
                         f"{type(windows).__name__} {tuple(getattr(windows, 'shape', ()))}")  # fmt: skip
    if windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"{where}: {name}.shape={tuple(windows.shape)} needs at least one window of >= 2 tokens")
    return windows


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
    with OnlyTraining(model, trainable):
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


@register_method
class BasisSelectionMethod(CompressionMethod):
    config_type = BasisConfig
    report_type = BasisReport
    fit_label = "selection"
    config: BasisConfig

    @property
    def calibration_purpose(self) -> str:
        return "BasisConfig (bases are scored on target data)"

    def check_inputs(self, train=None, heldout=None) -> None:
        if self.config.train_steps > 0:
            if train is None or heldout is None:
                raise ValueError(
                    f"compress_: BasisConfig train_steps={self.config.train_steps} needs target windows for training "
                    "and early stopping: pass train=... and heldout=... (LongTensors (N, seq_len))"
                )
            _check_windows(train, "train")
            _check_windows(heldout, "heldout")

    def check_layers(self, targets) -> None:
        shapes = [tuple(linear_weight(module).shape) for module in targets.values()]
        self.ratio = selection_ratio(shapes, self.config.param_ratio, self.config.new_rank)  # new bases paid from it

    def statistics(self) -> StatisticsNeed | None:
        config = self.config
        gram = config.basis == Method.whiten or config.score == BasisScore.energy or config.new_rank > 0
        return StatisticsNeed(gram=gram) if config.basis != Method.svd or gram else None

    def whole_model_selection(self) -> bool:
        return self.config.score != BasisScore.energy  # gradient scores need a backward pass through every layer

    def select(self, run, targets, stats) -> BasisPlan:
        config = self.config
        return select_by_score(run, targets, stats, basis=config.basis, alpha=config.alpha, score=config.score,
                               ratio=self.ratio, align=config.align, score_tokens=config.score_tokens)  # fmt: skip

    def ranks_only(self, plan: BasisPlan) -> BasisPlan:
        return plan.ranks_only()

    def fit(self, run, name, module, stats, plan: BasisPlan) -> LayerResult:
        config = self.config
        m, n = linear_weight(module).shape
        rank = plan.ranks[name]
        if rank is None:
            return BasisLayerResult(name, m, n, None, m * n, 0.0)
        if name in plan.kept:  # the bases selected on these very factors
            new = selected_module(plan, name)
        else:  # sequential mode after a whole-model selection: the leading `rank` bases in this layer's statistics
            factors = factor_layer(run, module, stats, config.basis, config.alpha)
            new = lowrank_module(module, factors, rank).add_coefficients()
        k = new_basis_count((m, n), rank, config.new_rank, config.align)
        if k > 0:
            W = linear_weight(module).detach().to(run.device, torch.float32)
            W_kept = new.to_linear().weight.detach().to(run.device, torch.float32)
            extra = new_bases(W, W_kept, stats, k)
            new.append_bases(extra.U, extra.V)
        run.replace(name, new)  # coefficients stay unfolded until `finish`
        if name in plan.kept:
            return selection_result(plan, name, new_bases=k)
        dropped = float(discarded_energy(factors.singular_values, rank, relative=True))
        return BasisLayerResult(name, m, n, rank + k, (rank + k) * (m + n), dropped, kept_bases=rank, new_bases=k,
                                spectrum_kept=1.0 - dropped)  # fmt: skip

    def finish(self, run, report: BasisReport) -> None:
        """Re-learn s (train_steps > 0), then fold it into U. The factored layers and their new-basis counts are
        read from the model and the report (a layer may have been fitted in another process)."""
        config = self.config
        kept: dict[str, LowRankLinear] = {row.name: run.model.get_submodule(row.name) for row in report.layers
                                          if row.rank is not None}  # fmt: skip
        new_counts = {row.name: row.new_bases for row in report.layers if row.rank is not None and row.new_bases}
        if config.train_steps > 0 and kept:
            with run.timed("training"):
                report.training = relearn_coefficients(run.model, kept, new_counts, run.inputs["train"],
                                                       run.inputs["heldout"], config, run.model_device,
                                                       run.progress)  # fmt: skip
        for module in kept.values():
            module.fold_coefficients()

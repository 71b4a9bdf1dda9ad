"""Compression configs: small validated dataclasses with a JSON round trip (`to_dict` / `config_from_dict`).

`LowRankConfig` covers the three low-rank methods of `compress_`:
- "svd":    plain truncated SVD of W (baseline; no calibration data),
- "asvd":   ASVD, W diag(s) with s = mean|x|^alpha per input channel, then SVD (Yuan et al., 2023),
- "whiten": SVD-LLM-style whitening, W S with S S^T = X^T X from the calibration Gram (Wang et al., 2024).
and four rank allocators:
- "uniform":     every layer at the same param ratio,
- "loss":        global greedy on the discarded whitened energy (SVD-LLM V2 style), one SVD per layer,
- "sensitivity": ASVD's search: calibration perplexity of each layer alone at candidate ratios, then one
                 global perplexity threshold found by binary search,
- "fisher":      one global selection of individual bases of the method's SVD by their empirical-Fisher loss
                 change on the calibration text (mean (s_i dL/ds_i)^2 over backward batches): basis selection
                 (`BasisConfig`, training-free) with the calibration text as the target. Measured on SmolLM2 at
                 0.9: perplexity 39.8 against 73.7 for "loss" (dense 32.8; benchmarks/results/quality-cpu.md).
`EoraConfig` covers a compressed (quantized) base plus a low-rank residual: EoRA, SVD-of-error and LQER residuals.
`SwscConfig` covers shared weights for similar channels (k-means codebook) plus a low-rank residual.
`BasisConfig` covers application-specific basis selection: SVD bases scored on target data, pruned, re-learned.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

METHODS = ("svd", "asvd", "whiten")
ALLOCATORS = ("uniform", "loss", "sensitivity", "fisher")
DEVICES = ("auto", "cpu", "cuda")


def _check_common_fields(config, name: str, extra_positive_ints: tuple[str, ...] = ()) -> None:
    """Checks shared by every config: calibration budget, device, surgery patterns."""
    for attr in ("calib_tokens", "seq_len", "batch_size", *extra_positive_ints):
        value = getattr(config, attr)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {attr}={value!r} must be an int >= 1")
    if config.calib_tokens < config.seq_len:
        raise ValueError(f"{name}: calib_tokens={config.calib_tokens} must be >= seq_len={config.seq_len} (one window)")
    if config.device not in DEVICES:
        raise ValueError(f"{name}: device={config.device!r} must be one of {list(DEVICES)}")
    for attr in ("targets", "ignore"):
        value = getattr(config, attr)
        if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
            raise ValueError(f"{name}: {attr}={value!r} must be a list of pattern strings or None")


class _Config:
    """What every config shares: validation on construction, and the JSON round trip (`config_from_dict` is the
    inverse of `to_dict`; the "kind" field names the class)."""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass
class LowRankConfig(_Config):
    """What `compress_` does to the targeted Linear layers.

    param_ratio: fraction of the targeted Linear parameters KEPT, in (0, 1] (embeddings, lm_head excluded).
    align: ranks are multiples of this (16: tensor-core friendly; see lowrank_ops.rank).
    targets / ignore: surgery patterns (class name, qualified name or "re:" regex); None = family defaults.
    calib_tokens / seq_len / batch_size: calibration budget, window length and batch (methods that need data).
    sensitivity_ratios / sensitivity_tokens: candidate per-layer ratios of the "sensitivity" allocator and the
        number of calibration tokens of each perplexity probe (one probe per layer and ratio: the search costs
        layers x ratios forwards of that many tokens; 4 x 210 x 256 tokens take ~11 min for SmolLM2 on 2 CPU cores).
    sequential: calibrate and compress one decoder layer at a time, feeding the next layer the outputs of the
        compressed one (only one decoder layer is on the device; see lowrank_ops.sequential). Needs a
        calibrating method and the "uniform" allocator (the others need every layer's statistics at once).
    """

    method: str = "whiten"
    param_ratio: float = 0.9
    allocator: str = "uniform"
    alpha: float = 0.5
    align: int = 16
    targets: list[str] | None = None
    ignore: list[str] | None = None
    calib_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 4
    device: str = "auto"
    sequential: bool = False
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85, 0.95])
    sensitivity_tokens: int = 256
    kind: str = field(default="lowrank", init=False)

    def validate(self) -> None:
        name = type(self).__name__
        if self.method not in METHODS:
            raise ValueError(f"{name}: method={self.method!r} must be one of {list(METHODS)}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"{name}: allocator={self.allocator!r} must be one of {list(ALLOCATORS)}")
        if not 0.0 < self.param_ratio <= 1.0:
            raise ValueError(f"{name}: param_ratio={self.param_ratio} must be in (0, 1] (fraction of parameters kept)")
        if not self.alpha > 0:
            raise ValueError(f"{name}: alpha={self.alpha} must be > 0")
        _check_common_fields(self, name, ("align", "sensitivity_tokens"))
        if not self.sensitivity_ratios or any(not 0 < r <= 1 for r in self.sensitivity_ratios):
            raise ValueError(f"{name}: sensitivity_ratios={self.sensitivity_ratios} must be non-empty, each in (0, 1]")
        if self.sequential and (self.method == "svd" or self.allocator != "uniform"):
            raise ValueError(
                f"{name}: sequential=True needs a calibrating method (asvd, whiten) and allocator='uniform', "
                f"got method={self.method!r}, allocator={self.allocator!r}"
            )

    @property
    def needs_calibration(self) -> bool:
        return self.method != "svd" or self.allocator in ("sensitivity", "fisher")

    def as_basis_selection(self) -> BasisConfig:
        """The training-free BasisConfig that allocator "fisher" runs: this method's bases, Fisher-scored."""
        return BasisConfig(param_ratio=self.param_ratio, basis=self.method, score="fisher", alpha=self.alpha,
                           align=self.align, targets=self.targets, ignore=self.ignore, calib_tokens=self.calib_tokens,
                           seq_len=self.seq_len, batch_size=self.batch_size, device=self.device)  # fmt: skip


RESIDUAL_METHODS = ("eora", "svd", "lqer")


@dataclass
class EoraConfig(_Config):
    """Compressed base plus low-rank residual (`compress_` -> `lowrank_ops.compress_quantized.compress_quantized_`).

    base: the base spec, "[gptq-]int{2,3,4,8}[-g<group_size>][-sym]" (e.g. "int4-g128", "gptq-int4-g128") or
        "2:4-magnitude" / "2:4-wanda" (grammar and meaning: `lowrank_ops.algorithms.eora`).
    rank: rank of the residual U V that compensates the base's error (0 = base only); must stay below every
        targeted layer's break-even rank m n / (m + n) (checked before any work).
    residual: "eora" (eigenspace of the calibration Gram), "svd" (plain SVD of the error, ZeroQuant-V2 / LoRC) or
        "lqer" (diagonal mean-|x| scaling, LQER).
    targets / ignore / calib_tokens / seq_len / batch_size / device: as in LowRankConfig. Calibration runs when the
        base (GPTQ, Wanda) or the residual (eora, lqer) needs statistics.
    sequential: calibrate and compress one decoder layer at a time, each on the outputs of the already-compressed
        layers before it (as GPTQ does; one decoder layer on the device; see lowrank_ops.sequential). Needs a base or
        residual that uses calibration statistics.
    """

    base: str = "int4-g128"
    rank: int = 64
    residual: str = "eora"
    targets: list[str] | None = None
    ignore: list[str] | None = None
    calib_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 4
    device: str = "auto"
    sequential: bool = False
    kind: str = field(default="eora", init=False)

    def validate(self) -> None:
        from lowrank_ops.algorithms.eora import parse_base_spec

        name = type(self).__name__
        try:
            parse_base_spec(self.base)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: base={self.base!r} is invalid ({exc})") from None
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"{name}: rank={self.rank!r} must be an int >= 0 (0 = base only)")
        if self.residual not in RESIDUAL_METHODS:
            raise ValueError(f"{name}: residual={self.residual!r} must be one of {list(RESIDUAL_METHODS)}")
        _check_common_fields(self, name)
        if not isinstance(self.sequential, bool):
            raise ValueError(f"{name}: sequential={self.sequential!r} must be a bool")
        if self.sequential and not self.needs_calibration:
            raise ValueError(f"{name}: sequential=True needs a base or residual that uses calibration statistics "
                             f"(gptq-*, 2:4-wanda, residual eora / lqer), got base={self.base!r}, "
                             f"residual={self.residual!r}, rank={self.rank}")  # fmt: skip

    @property
    def needs_calibration(self) -> bool:
        from lowrank_ops.algorithms.eora import parse_base_spec

        return parse_base_spec(self.base).needs_gram or (self.rank > 0 and self.residual != "svd")


SHARED_DIMS = ("rows", "columns")


@dataclass
class SwscConfig(_Config):
    """Shared weight for similar channels plus a low-rank residual (`compress_` ->
    `lowrank_ops.compress_shared.compress_shared_channels_`; the math is in `lowrank_ops.algorithms.swsc`).

    shared: "rows" (output channels share K codebook rows) or "columns" (input channels share K codebook columns).
    clusters / bits: give exactly one. clusters: K for every layer (an error for a layer with fewer channels);
        bits: a per-layer budget in bits per weight (codebook + int32 index + residual factors, 16-bit values), K is
        the largest that fits next to the rank-`rank` residual.
    rank: rank of the residual that compensates W - W_shared (0: none).
    residual: "svd" (plain SVD of the error, as in the SWSC paper), "eora" (whitened by the calibration Gram) or
        "lqer" (mean-|x| scaled); see `lowrank_ops.algorithms.eora`.
    weighted: weight k-means by (mean |x|)^2 per input channel (needs calibration): the distance's features for
        shared rows, the points (weighted centroids) for shared columns.
    n_iter / seed: k-means iteration cap and seed.
    targets / ignore / calib_tokens / seq_len / batch_size / device: as in LowRankConfig.
    """

    shared: str = "rows"
    clusters: int | None = None
    bits: float | None = 3.0
    rank: int = 32
    residual: str = "svd"
    weighted: bool = True
    n_iter: int = 50
    seed: int = 0
    targets: list[str] | None = None
    ignore: list[str] | None = None
    calib_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 4
    device: str = "auto"
    kind: str = field(default="swsc", init=False)

    def validate(self) -> None:
        name = type(self).__name__
        if self.shared not in SHARED_DIMS:
            raise ValueError(f"{name}: shared={self.shared!r} must be one of {list(SHARED_DIMS)}")
        if (self.clusters is None) == (self.bits is None):
            raise ValueError(f"{name}: give exactly one of clusters or bits (got clusters={self.clusters}, "
                             f"bits={self.bits})")  # fmt: skip
        if self.clusters is not None and (isinstance(self.clusters, bool) or not isinstance(self.clusters, int)
                                          or self.clusters < 1):  # fmt: skip
            raise ValueError(f"{name}: clusters={self.clusters!r} must be an int >= 1")
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, (int, float))
                                      or not 0 < self.bits < 16):  # fmt: skip
            raise ValueError(f"{name}: bits={self.bits!r} must be a number in (0, 16) (bits per weight)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"{name}: rank={self.rank!r} must be an int >= 0 (0 = no residual)")
        if self.residual not in RESIDUAL_METHODS:
            raise ValueError(f"{name}: residual={self.residual!r} must be one of {list(RESIDUAL_METHODS)}")
        if not isinstance(self.weighted, bool):
            raise ValueError(f"{name}: weighted={self.weighted!r} must be a bool")
        for attr in ("n_iter", "seed"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {attr}={value!r} must be an int >= 0")
        _check_common_fields(self, name)

    @property
    def needs_calibration(self) -> bool:
        return self.weighted or (self.rank > 0 and self.residual != "svd")


BASIS_SCORES = ("energy", "taylor", "fisher")


@dataclass
class BasisConfig(_Config):
    """Application-specific basis selection (`compress_` -> `lowrank_ops.basis.compress_basis_`; the math is in
    `lowrank_ops.algorithms.basis_selection`).

    Each targeted W is decomposed at full rank as W = sum_i s_i u_i v_i^T, each basis i is scored on TARGET data
    (the calibration windows given to compress_), the lowest-scoring bases are pruned under one global parameter
    budget, and optionally s is re-learned (U, V frozen) with `new_rank` new bases per layer fitted on target data.

    param_ratio: fraction of the targeted Linear parameters KEPT, in (0, 1]; new bases are paid from it.
    basis: the decomposition whose bases are selected: "whiten" (SVD of W S with S S^T the target Gram, default),
        "asvd" (S = diag(mean|x|^alpha)) or "svd" (plain SVD of W, as in the basis-selection paper).
    score: "energy" (s_i^2 ||u_i||^2 v_i^T G v_i, the target output energy of basis i; allocated on each layer's
        fraction of it), "taylor" (|s_i dL/ds_i| over the calibration windows, a first-order loss change) or
        "fisher" (mean over backward batches of (s_i dL_b/ds_i)^2, the empirical-Fisher loss change); the gradient
        scores are in loss units and allocated on their absolute sum. Default "fisher": removing a basis is a large
        step (s_i: 1 -> 0) from a near-stationary point, where the first-order term is small and noisy and the
        second-order term, which the Fisher estimates, dominates (it is also the variant measured in
        benchmarks/results/basis_selection-cpu.md).
    score_tokens: calibration tokens run forward and backward for the gradient scores.
    new_rank: new bases per factored layer, initialised from the leading eigen-directions of the target residual
        (EoRA: whitened SVD of W - W_kept with the target Gram); capped where the layer would reach break-even.
    train_steps: optimizer steps re-learning s (and the new bases' factors) on `train` windows, 0 = training-free;
        held-out loss every `eval_every` steps, stop after `patience` evaluations without improvement, best kept.
    lr: Adam learning rate, relative: s starts at 1, and the new factors' rate is lr times their initial RMS.
    seed: orders the training batches (the result is deterministic for a seed on a given machine).
    alpha / align / targets / ignore / calib_tokens / seq_len / batch_size / device: as in LowRankConfig.
    """

    param_ratio: float = 0.8
    basis: str = "whiten"
    score: str = "fisher"
    score_tokens: int = 4096
    new_rank: int = 0
    train_steps: int = 0
    lr: float = 5e-3
    eval_every: int = 5
    patience: int = 2
    seed: int = 0
    alpha: float = 0.5
    align: int = 16
    targets: list[str] | None = None
    ignore: list[str] | None = None
    calib_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 4
    device: str = "auto"
    kind: str = field(default="basis", init=False)

    def validate(self) -> None:
        name = type(self).__name__
        if isinstance(self.param_ratio, bool) or not isinstance(self.param_ratio, (int, float)) \
                or not 0.0 < self.param_ratio <= 1.0:  # fmt: skip
            raise ValueError(f"{name}: param_ratio={self.param_ratio!r} must be in (0, 1] (fraction of params kept)")
        if self.basis not in METHODS:
            raise ValueError(f"{name}: basis={self.basis!r} must be one of {list(METHODS)}")
        if self.score not in BASIS_SCORES:
            raise ValueError(f"{name}: score={self.score!r} must be one of {list(BASIS_SCORES)}")
        for attr in ("new_rank", "train_steps", "patience", "seed"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: {attr}={value!r} must be an int >= 0")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"{name}: lr={self.lr!r} must be a number > 0")
        if not self.alpha > 0:
            raise ValueError(f"{name}: alpha={self.alpha} must be > 0")
        _check_common_fields(self, name, ("align", "score_tokens", "eval_every"))

    @property
    def needs_calibration(self) -> bool:
        return True  # the scores are measured on target data

    @property
    def needs_training_data(self) -> bool:
        return self.train_steps > 0


CONFIG_KINDS = {"lowrank": LowRankConfig, "eora": EoraConfig, "swsc": SwscConfig, "basis": BasisConfig}


def config_from_dict(data: dict):
    """Inverse of `to_dict`: the config class is chosen by the "kind" key."""
    data = dict(data)
    kind = data.pop("kind", None)
    if kind not in CONFIG_KINDS:
        raise ValueError(f"config_from_dict: kind={kind!r} must be one of {list(CONFIG_KINDS)}")
    cls = CONFIG_KINDS[kind]
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config_from_dict: unknown field(s) {unknown} for {cls.__name__}")
    return cls(**data)


def config_from_json(text: str):
    return config_from_dict(json.loads(text))

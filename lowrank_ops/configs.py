"""Compression configs: small validated dataclasses with a JSON round trip (`to_dict` / `config_from_dict`).

Every config derives from `CompressionConfig`, which holds what every method shares (surgery patterns, the
calibration budget, the device, sequential mode and the config format `version`); options are the string enums of
`lowrank_ops.options`; every rule that ties fields together is checked here, on construction, so the CLI and the
Python API reject the same things with the same messages. Fields are keyword-only.

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
                 change on the calibration text (mean (s_i dL/ds_i)^2 over backward batches): the selection step
                 of basis selection, with the calibration text as the target. Measured on SmolLM2 at 0.9:
                 perplexity 39.8 against 73.7 for "loss" (dense 32.8; benchmarks/results/quality-cpu.md).
`BaseResidualConfig` covers a compressed base -- quantized (RTN / GPTQ) or 2:4-pruned -- plus a low-rank residual
    fitted by EoRA, plain SVD of the error or LQER (`EoraConfig` is its former name, kept for existing code).
`SwscConfig` covers shared weights for similar channels (k-means codebook) plus a low-rank residual.
`BasisConfig` covers application-specific basis selection: SVD bases scored on target data, pruned, re-learned.

Sequential mode (`sequential=True`, every method): one decoder layer at a time is calibrated and compressed, each on
the outputs of the already-compressed layers before it; what a global step (allocation, selection) does in that
mode is written in `lowrank_ops.compress.runner`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from lowrank_ops.formats import parse_base_spec
from lowrank_ops.options import Allocator, BasisScore, Device, Method, Option, Residual, SharedDim

CONFIG_VERSION = 1
"""Format of a config's dict. Dicts written before the field existed (no "version") are version 1."""


def _positive_int(config, attr: str, minimum: int = 1) -> None:
    value = getattr(config, attr)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{type(config).__name__}: {attr}={value!r} must be an int >= {minimum}")


def _ratio(config, attr: str = "param_ratio") -> None:
    value = getattr(config, attr)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{type(config).__name__}: {attr}={value!r} must be in (0, 1] (fraction of parameters kept)")


def _option(config, attr: str, kind: type[Option]) -> None:
    setattr(config, attr, kind.parse(getattr(config, attr), type(config).__name__, attr))


def _flag(config, attr: str) -> None:
    if not isinstance(getattr(config, attr), bool):
        raise ValueError(f"{type(config).__name__}: {attr}={getattr(config, attr)!r} must be a bool")


@dataclass(kw_only=True)
class CompressionConfig:
    """What every method's config shares.

    targets / ignore: surgery patterns (class name, qualified name or "re:" regex); None = the family's defaults.
    calib_tokens / seq_len / batch_size: calibration budget, window length and batch (methods that need data).
    device: where decompositions run ("auto": CUDA when available).
    sequential: calibrate and compress one decoder layer at a time, each on the outputs of the compressed layers
        before it (one decoder layer on the device; `lowrank_ops.compress.runner`). Needs calibration statistics.
    version: the config format (CONFIG_VERSION).
    """

    targets: list[str] | None = None
    ignore: list[str] | None = None
    calib_tokens: int = 16384
    seq_len: int = 512
    batch_size: int = 4
    device: str = "auto"
    sequential: bool = False
    version: int = CONFIG_VERSION

    kind = "config"  # the name of the config in its dict (class attribute; `config_from_dict` maps it back)
    calibrates_on_target_data = False  # True: the calibration text is the target application's (basis selection)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every rule of the config; subclasses check their own fields, then call this."""
        name = type(self).__name__
        for attr in ("calib_tokens", "seq_len", "batch_size"):
            _positive_int(self, attr)
        if self.calib_tokens < self.seq_len:
            raise ValueError(f"{name}: calib_tokens={self.calib_tokens} must be >= seq_len={self.seq_len} (one window)")
        _option(self, "device", Device)
        for attr in ("targets", "ignore"):
            value = getattr(self, attr)
            if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
                raise ValueError(f"{name}: {attr}={value!r} must be a list of pattern strings or None")
        _flag(self, "sequential")
        if self.version != CONFIG_VERSION:
            raise ValueError(f"{name}: version={self.version!r}; this lowrank_ops reads version {CONFIG_VERSION}")
        if self.sequential and not self.needs_calibration:
            raise ValueError(f"{name}: sequential=True needs calibration statistics, and {self.describe()} uses none "
                             "(sequential mode would compress exactly as one-shot mode does)")  # fmt: skip

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing needs calibration token ids."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line naming the method and its main choices (the CLI summary's variant column)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@dataclass(kw_only=True)
class LowRankConfig(CompressionConfig):
    """Low-rank factors U V of every targeted layer (`compress_` -> `lowrank_ops.compress.lowrank`).

    method: "svd" | "asvd" | "whiten" (module docstring); alpha: ASVD's exponent of mean |x|.
    param_ratio: fraction of the targeted Linear parameters KEPT, in (0, 1] (embeddings, lm_head excluded).
    allocator: "uniform" | "loss" | "sensitivity" | "fisher" (module docstring).
    align: ranks are multiples of this (16: tensor-core friendly; see lowrank_ops.rank).
    sensitivity_ratios / sensitivity_tokens: candidate per-layer ratios of the "sensitivity" allocator and the
        number of calibration tokens of each perplexity probe (one probe per layer and ratio: the search costs
        layers x ratios forwards of that many tokens; 4 x 210 x 256 tokens take ~11 min for SmolLM2 on 2 CPU cores).
    score_tokens: calibration tokens run forward and backward for the "fisher" allocator's scores.
    """

    method: Method = Method.whiten
    param_ratio: float = 0.9
    allocator: Allocator = Allocator.uniform
    alpha: float = 0.5
    align: int = 16
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.85, 0.95])
    sensitivity_tokens: int = 256
    score_tokens: int = 4096

    kind = "lowrank"

    def validate(self) -> None:
        name = type(self).__name__
        _option(self, "method", Method)
        _option(self, "allocator", Allocator)
        _ratio(self)
        if not self.alpha > 0:
            raise ValueError(f"{name}: alpha={self.alpha} must be > 0")
        for attr in ("align", "sensitivity_tokens", "score_tokens"):
            _positive_int(self, attr)
        if not self.sensitivity_ratios or any(not 0 < r <= 1 for r in self.sensitivity_ratios):
            raise ValueError(f"{name}: sensitivity_ratios={self.sensitivity_ratios} must be non-empty, each in (0, 1]")
        super().validate()

    @property
    def needs_calibration(self) -> bool:
        return self.method != Method.svd or self.allocator in (Allocator.sensitivity, Allocator.fisher)

    def describe(self) -> str:
        return f"{self.method} / {self.allocator}" + (" (sequential)" if self.sequential else "")


@dataclass(kw_only=True)
class BaseResidualConfig(CompressionConfig):
    """A compressed base plus a low-rank residual (`compress_` -> `lowrank_ops.compress.base_residual`).

    base: the base spec, "[gptq-]int{2,3,4,8}[-g<group_size>][-sym]" (e.g. "int4-g128", "gptq-int4-g128") or
        "2:4-magnitude" / "2:4-wanda" (grammar: `lowrank_ops.formats`; meaning: `lowrank_ops.algorithms.eora`).
    rank: rank of the residual U V that compensates the base's error (0 = base only); must stay below every
        targeted layer's break-even rank m n / (m + n) (checked before any work).
    residual: "eora" (eigenspace of the calibration Gram), "svd" (plain SVD of the error, ZeroQuant-V2 / LoRC) or
        "lqer" (diagonal mean-|x| scaling, LQER). Calibration runs when the base (GPTQ, Wanda) or the residual
        (eora, lqer) needs statistics; sequential=True with a GPTQ base is sequential GPTQ.
    """

    base: str = "int4-g128"
    rank: int = 64
    residual: Residual = Residual.eora

    kind = "base_residual"

    def validate(self) -> None:
        name = type(self).__name__
        try:
            parse_base_spec(self.base)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name}: base={self.base!r} is invalid ({exc})") from None
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"{name}: rank={self.rank!r} must be an int >= 0 (0 = base only)")
        _option(self, "residual", Residual)
        super().validate()

    @property
    def needs_calibration(self) -> bool:
        return parse_base_spec(self.base).needs_gram or (self.rank > 0 and self.residual != Residual.svd)

    def describe(self) -> str:
        return f"{self.base} + {self.residual} r={self.rank}" + (" (sequential)" if self.sequential else "")


EoraConfig = BaseResidualConfig
"""The former name of BaseResidualConfig (it covers SVD / LQER residuals and 2:4 bases too)."""


@dataclass(kw_only=True)
class SwscConfig(CompressionConfig):
    """Shared weight for similar channels plus a low-rank residual (`compress_` -> `lowrank_ops.compress.shared`;
    the math is in `lowrank_ops.algorithms.swsc`, the storage rules in `lowrank_ops.formats`).

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
    """

    shared: SharedDim = SharedDim.rows
    clusters: int | None = None
    bits: float | None = 3.0
    rank: int = 32
    residual: Residual = Residual.svd
    weighted: bool = True
    n_iter: int = 50
    seed: int = 0

    kind = "swsc"

    def validate(self) -> None:
        name = type(self).__name__
        _option(self, "shared", SharedDim)
        if (self.clusters is None) == (self.bits is None):
            raise ValueError(f"{name}: give exactly one of clusters or bits (got clusters={self.clusters}, "
                             f"bits={self.bits})")  # fmt: skip
        if self.clusters is not None:
            _positive_int(self, "clusters")
        if self.bits is not None and (isinstance(self.bits, bool) or not isinstance(self.bits, (int, float))
                                      or not 0 < self.bits < 16):  # fmt: skip
            raise ValueError(f"{name}: bits={self.bits!r} must be a number in (0, 16) (bits per weight)")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"{name}: rank={self.rank!r} must be an int >= 0 (0 = no residual)")
        _option(self, "residual", Residual)
        _flag(self, "weighted")
        for attr in ("n_iter", "seed"):
            _positive_int(self, attr, minimum=0)
        super().validate()

    @property
    def needs_calibration(self) -> bool:
        return self.weighted or (self.rank > 0 and self.residual != Residual.svd)

    def describe(self) -> str:
        size = f"K={self.clusters}" if self.clusters is not None else f"{self.bits} bits"
        return f"swsc {self.shared} {size} + {self.residual} r={self.rank}" + (
            " (sequential)" if self.sequential else "")


@dataclass(kw_only=True)
class BasisConfig(CompressionConfig):
    """Application-specific basis selection (`compress_` -> `lowrank_ops.compress.basis`; the math is in
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
    alpha / align: as in LowRankConfig.
    """

    param_ratio: float = 0.8
    basis: Method = Method.whiten
    score: BasisScore = BasisScore.fisher
    score_tokens: int = 4096
    new_rank: int = 0
    train_steps: int = 0
    lr: float = 5e-3
    eval_every: int = 5
    patience: int = 2
    seed: int = 0
    alpha: float = 0.5
    align: int = 16

    kind = "basis"
    calibrates_on_target_data = True

    def validate(self) -> None:
        name = type(self).__name__
        _ratio(self)
        _option(self, "basis", Method)
        _option(self, "score", BasisScore)
        for attr in ("new_rank", "train_steps", "patience", "seed"):
            _positive_int(self, attr, minimum=0)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise ValueError(f"{name}: lr={self.lr!r} must be a number > 0")
        if not self.alpha > 0:
            raise ValueError(f"{name}: alpha={self.alpha} must be > 0")
        for attr in ("align", "score_tokens", "eval_every"):
            _positive_int(self, attr)
        super().validate()

    @property
    def needs_calibration(self) -> bool:
        return True  # the scores are measured on target data

    @property
    def needs_training_data(self) -> bool:
        return self.train_steps > 0

    def describe(self) -> str:
        trained = f", {self.train_steps} steps" if self.train_steps else ""
        return f"basis {self.basis}/{self.score} +{self.new_rank}{trained}" + (
            " (sequential)" if self.sequential else "")


CONFIG_KINDS: dict[str, type[CompressionConfig]] = {
    cls.kind: cls for cls in (LowRankConfig, BaseResidualConfig, SwscConfig, BasisConfig)
}
_LEGACY_KINDS = {"eora": BaseResidualConfig.kind}  # dicts written before BaseResidualConfig was named so


def config_from_dict(data: dict) -> CompressionConfig:
    """Inverse of `to_dict`: the config class is chosen by the "kind" key."""
    data = dict(data)
    kind = data.pop("kind", None)
    kind = _LEGACY_KINDS.get(kind, kind)
    if kind not in CONFIG_KINDS:
        raise ValueError(f"config_from_dict: kind={kind!r} must be one of {list(CONFIG_KINDS)}")
    cls = CONFIG_KINDS[kind]
    data.setdefault("version", 1)  # written before configs had a version
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config_from_dict: unknown field(s) {unknown} for {cls.__name__}")
    return cls(**data)


def config_from_json(text: str) -> CompressionConfig:
    return config_from_dict(json.loads(text))

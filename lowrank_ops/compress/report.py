"""What `compress_` returns: one row per targeted layer and the totals. The bottom of the compress package: every
method's handler builds these, nothing here knows a method."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REPORT_VALUE_BITS = 16
"""Width at which float values (factors, codebooks, scales, zero points, dense weights) are counted in bit budgets
and reports: fp16 / bf16, the deployment dtype, whatever dtype the compression ran in (a float32 run on a CPU stores
twice the float bytes; the modules' own `bits_per_weight` counts what they store)."""


@dataclass
class LayerResult:
    name: str
    out_features: int
    in_features: int
    rank: int | None  # None: kept dense (a factored layer would not save parameters)
    kept_params: int
    discarded_energy: float | None  # fraction of the (whitened) energy of W S dropped by the truncation


@dataclass
class CompressionReport:
    config: dict
    layers: list[LayerResult]
    embedding_params: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def targeted_params(self) -> int:
        return sum(layer.out_features * layer.in_features for layer in self.layers)

    @property
    def kept_params(self) -> int:
        return sum(layer.kept_params for layer in self.layers)

    @property
    def param_ratio(self) -> float:
        """Fraction of the targeted Linear parameters kept (embeddings and lm_head excluded)."""
        return self.kept_params / self.targeted_params

    @property
    def bits_per_weight(self) -> float | None:
        """Storage bits per targeted weight with floats at REPORT_VALUE_BITS, for layers that report it (quantized /
        shared-channel layers; dense layers count REPORT_VALUE_BITS); None when no layer does (plain low-rank:
        param_ratio is the headline)."""
        if not any(hasattr(layer, "bits_per_weight") for layer in self.layers):
            return None
        bits = sum(getattr(layer, "bits_per_weight", REPORT_VALUE_BITS) * layer.out_features * layer.in_features
                   for layer in self.layers)  # fmt: skip
        return bits / self.targeted_params

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "param_ratio": self.param_ratio,
            "bits_per_weight": self.bits_per_weight,
            "targeted_params": self.targeted_params,
            "kept_params": self.kept_params,
            "embedding_and_lm_head_params": self.embedding_params,
            "seconds": self.seconds,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def format_table(self) -> str:
        bits = self.bits_per_weight
        bits_header = f" {'bits/w':>7s}" if bits is not None else ""
        lines = [f"{'layer':48s} {'shape':>11s} {'rank':>6s} {'kept':>6s} {'dropped energy':>14s}{bits_header}"]
        for layer in self.layers:
            rank = "dense" if layer.rank is None else str(layer.rank)
            kept = layer.kept_params / (layer.out_features * layer.in_features)
            dropped = "" if layer.discarded_energy is None else f"{layer.discarded_energy:.4f}"
            shape = f"{layer.out_features}x{layer.in_features}"
            layer_bits = f" {getattr(layer, 'bits_per_weight', REPORT_VALUE_BITS):7.3f}" if bits is not None else ""
            lines.append(f"{layer.name:48s} {shape:>11s} {rank:>6s} {kept:6.3f} {dropped:>14s}{layer_bits}")
        lines.append(
            f"targeted params kept: {self.kept_params:,} / {self.targeted_params:,} = {self.param_ratio:.4f} "
            f"(embeddings + lm_head, not targeted: {self.embedding_params:,})"
        )
        if bits is not None:
            lines.append(f"storage of the targeted layers: {bits:.3f} bits per weight ({REPORT_VALUE_BITS}-bit floats)")
        return "\n".join(lines)

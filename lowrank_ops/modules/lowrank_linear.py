"""LowRankLinear: a drop-in nn.Linear whose weight is stored as two factors, W ~= U V.

Forward: y = U (V x) + b through `torch.ops.lowrank_ops.lowrank_matmul` (Triton decode / tiled kernels on
GPU, torch elsewhere).

state_dict keys (stable; later modules and checkpoints rely on them):
    v     (rank, in_features)   the "shrink" factor, V = Sigma_r^{1/2} V_r^T for plain SVD
    u     (out_features, rank)  the "expand" factor, U = U_r Sigma_r^{1/2}
    bias  (out_features,)       only when bias=True
    s     (rank,)               only on an UNFOLDED module (`add_coefficients`, basis selection): per-basis
                                coefficients, y = U (s * (V x)) + b; `fold_coefficients` multiplies s into U and
                                removes it, so saved / deployed modules never carry it

Coefficients (application-specific basis selection, `lowrank_ops.compress.methods.basis`): W = sum_i s_i u_i v_i^T
with s learnable and U, V frozen. While s exists the forward is z = V x, y = U (s * z) + b in plain torch (two F.linear
calls), so the gradient of s costs O(tokens r) (sum of z * U^T dy) instead of the r n tokens of a gradient through
s * V; after `fold_coefficients` the module runs the fused op again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_ops.modules.compressed import CompressedLinear, entry_choice, entry_int
from lowrank_ops.ops.lowrank_matmul import lowrank_matmul
from lowrank_ops.rank import DEFAULT_ALIGN, param_ratio, rank_for_param_ratio, validate_rank


class LowRankLinear(CompressedLinear):
    """y = U (V x) + b with U (out_features, rank), V (rank, in_features).

    Args mirror nn.Linear plus `rank` (1 <= rank <= min(in_features, out_features)). Fresh modules are
    initialised so that U V has nn.Linear's default variance; use `from_linear` to factor a trained layer.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=None, device=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LowRankLinear: {name}={value!r} must be an int >= 1")
        validate_rank(rank, out_features, in_features, "LowRankLinear")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        factory = {"dtype": dtype, "device": device}
        self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.u = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Match nn.Linear's init variance Var(W_ij) = 1 / (3 n) for W = U V.

        Var(W_ij) = r Var(U) Var(V); V ~ U(-1/sqrt(n), 1/sqrt(n)) has Var 1 / (3 n), so Var(U) = 1 / r,
        i.e. U ~ U(-sqrt(3 / r), sqrt(3 / r)).
        """
        n, r = self.in_features, self.rank
        v_bound = 1.0 / math.sqrt(n)
        u_bound = math.sqrt(3.0 / r)
        nn.init.uniform_(self.v, -v_bound, v_bound)
        nn.init.uniform_(self.u, -u_bound, u_bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -v_bound, v_bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = getattr(self, "s", None)
        if s is None:
            return lowrank_matmul(x, self.v, self.u, self.bias)
        return F.linear(F.linear(x, self.v) * s, self.u, self.bias)

    @property
    def has_coefficients(self) -> bool:
        """True while the module carries an unfolded coefficient vector s."""
        return getattr(self, "s", None) is not None

    def add_coefficients(self, s: torch.Tensor | None = None) -> LowRankLinear:
        """Give the module a coefficient parameter s (rank,) (default: ones, which leaves the output unchanged)."""
        if self.has_coefficients:
            raise ValueError("LowRankLinear.add_coefficients: the module already has coefficients s")
        if s is None:
            s = torch.ones(self.rank, dtype=self.v.dtype, device=self.v.device)
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (self.rank,):
            shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
            raise ValueError(f"LowRankLinear.add_coefficients: s must have shape (rank,) = ({self.rank},), got {shape}")
        self.s = nn.Parameter(s.detach().to(self.v.dtype, copy=True).to(self.v.device))
        return self

    @torch.no_grad()
    def fold_coefficients(self) -> LowRankLinear:
        """U <- U diag(s), then remove s: a plain LowRankLinear with the same product (exact up to one rounding
        of u_ij s_j in the factors' dtype). A module without s is returned unchanged."""
        if self.has_coefficients:
            s = self.s.detach()
            del self.s
            self.u.mul_(s.to(self.u.dtype)[None, :])
        return self

    @torch.no_grad()
    def append_bases(self, u: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None = None) -> LowRankLinear:
        """Grow the rank by k: U <- [U, u] (u: (out_features, k)), V <- [V; v] (v: (k, in_features)), and when the
        module has coefficients s <- [s; s_new] (default ones). The parameters are replaced by new ones (an
        optimizer holding the old ones must be rebuilt); rank + k must stay <= min(in_features, out_features)."""
        if u.dim() != 2 or v.dim() != 2 or u.shape[0] != self.out_features or v.shape[1] != self.in_features \
                or u.shape[1] != v.shape[0]:  # fmt: skip
            raise ValueError(
                f"LowRankLinear.append_bases: u.shape={tuple(u.shape)} must be (out_features={self.out_features}, k) "
                f"and v.shape={tuple(v.shape)} must be (k, in_features={self.in_features})"
            )
        k = u.shape[1]
        rank = validate_rank(self.rank + k, self.out_features, self.in_features, "LowRankLinear.append_bases")
        grad = self.u.requires_grad
        self.u = nn.Parameter(torch.cat([self.u.detach(), u.to(self.u)], dim=1), requires_grad=grad)
        self.v = nn.Parameter(torch.cat([self.v.detach(), v.to(self.v)], dim=0), requires_grad=grad)
        if self.has_coefficients:
            s = torch.ones(k, dtype=self.s.dtype, device=self.s.device) if s is None else s.to(self.s)
            if tuple(s.shape) != (k,):
                raise ValueError(f"LowRankLinear.append_bases: s.shape={tuple(s.shape)} must be ({k},)")
            self.s = nn.Parameter(torch.cat([self.s.detach(), s]), requires_grad=self.s.requires_grad)
        elif s is not None:
            self.u[:, -k:] *= s.to(self.u)[None, :]
        self.rank = rank
        return self

    @property
    def param_ratio(self) -> float:
        """Fraction of the dense weight's parameters kept: r (m + n) / (m n) (bias excluded)."""
        return param_ratio(self.out_features, self.in_features, self.rank)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, param_ratio={self.param_ratio:.3f}"
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int | None = None,
        param_ratio: float | None = None,
        align: int = DEFAULT_ALIGN,
        svd: str = "auto",
    ) -> LowRankLinear:
        """Factor `linear` by truncated SVD, W ~= (U_r Sigma_r^{1/2}) (Sigma_r^{1/2} V_r^T).

        Give exactly one of `rank` (honoured exactly) or `param_ratio` (fraction of parameters kept; the rank is
        rounded down to a multiple of `align`, see lowrank_ops.rank). The SVD runs in float32 (float64 if the
        layer is float64) on the layer's device; the factors take the layer's dtype and device.

        svd: "exact" (the full SVD: the optimal truncation), "randomized" (`randomized_svd`, block Krylov: within
        0.6 % of the optimal error even on a flat spectrum), or "auto": randomized where its basis spans at most
        half of min(m, n) (`uses_randomized_svd`), where it is the faster one, else exact. On a busy 2-core CPU, 4096
        x 4096: exact 43-70 s; randomized at rank 256 5-9 s.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LowRankLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        if (rank is None) == (param_ratio is None):
            raise ValueError(
                "LowRankLinear.from_linear: give exactly one of rank or param_ratio "
                f"(got rank={rank}, param_ratio={param_ratio})"
            )
        if param_ratio is not None and (isinstance(param_ratio, bool) or not isinstance(param_ratio, (int, float))
                                        or not 0 < param_ratio <= 1):  # fmt: skip
            raise ValueError(f"LowRankLinear.from_linear: param_ratio={param_ratio!r} must be > 0 and <= 1 (the "
                             "fraction of parameters kept)")  # fmt: skip
        weight = linear.weight.detach()
        m, n = weight.shape
        if rank is None:
            rank = rank_for_param_ratio(m, n, param_ratio, align=align)
        validate_rank(rank, m, n, "LowRankLinear.from_linear")
        if not torch.isfinite(weight).all():
            bad = (~torch.isfinite(weight)).nonzero()[0].tolist()
            raise ValueError(
                f"LowRankLinear.from_linear: the weight ({m}, {n}) has NaN/Inf, first at index {tuple(bad)}"
            )
        if svd not in ("auto", "exact", "randomized"):
            raise ValueError(f"LowRankLinear.from_linear: svd={svd!r} must be 'auto', 'exact' or 'randomized'")
        randomized = svd == "randomized" or (svd == "auto" and uses_randomized_svd(m, n, rank))
        u, v = _truncated_svd_factors(weight, rank, randomized)
        module = cls(n, m, rank, bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            module.u.copy_(u)
            module.v.copy_(v)
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach())
        return module

    def _manifest_fields(self) -> dict:
        return {"coefficients": True} if self.has_coefficients else {}  # y = U (s * V x) kept unfolded

    @classmethod
    def check_manifest_entry(cls, name: str, entry: dict, where: str = "load_compressed") -> None:
        super().check_manifest_entry(name, entry, where)
        entry_int(entry, "rank", name, where, 1, min(entry["in_features"], entry["out_features"]))
        entry_choice(entry, "coefficients", name, where, (True, False), optional=True)

    @classmethod
    def _empty(cls, name: str, entry: dict) -> LowRankLinear:
        module = cls(entry["in_features"], entry["out_features"], entry["rank"], bias=entry["bias"])
        return module.add_coefficients() if entry.get("coefficients") else module

    def to_linear(self, residual: bool = True) -> nn.Linear:
        """The dense layer with W = U V (computed in float32 at least, cast to the factors' dtype); `residual` is
        ignored (the factors are the whole layer)."""
        factory = {"dtype": self.u.dtype, "device": self.u.device}
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, **factory)
        compute = torch.promote_types(self.u.dtype, torch.float32)
        with torch.no_grad():
            v = self.v.detach().to(compute)
            if self.has_coefficients:
                v = self.s.detach().to(compute)[:, None] * v
            linear.weight.copy_(self.u.detach().to(compute) @ v)
            if self.bias is not None:
                linear.bias.copy_(self.bias.detach())
        return linear


_RANDOMIZED_ITERATIONS = 2  # randomized_svd's default n_iter: its basis has (rank + oversample) x 3 columns


def uses_randomized_svd(m: int, n: int, rank: int) -> bool:
    """Whether `from_linear(svd="auto")` factors an (m, n) weight at `rank` by the randomized SVD: when its block
    Krylov basis spans at most half of min(m, n). Measured on a 2-core CPU, 4096 x 4096 float32: rank 256 (768 + 192
    columns) 9 s, rank 512 18 s, rank 1024 (3840 columns, refused here) 69 s, the same as the exact SVD's 69 s."""
    from lowrank_ops.engine import default_oversample

    return (rank + default_oversample(rank)) * (_RANDOMIZED_ITERATIONS + 1) <= min(m, n) // 2


def _truncated_svd_factors(weight: torch.Tensor, rank: int, randomized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r Sigma_r^{1/2}, Sigma_r^{1/2} V_r^T) of `weight`, computed in float32 or float64."""
    from lowrank_ops.engine import exact_svd, randomized_svd

    compute = torch.promote_types(weight.dtype, torch.float32)
    if randomized:
        u, s, vh = randomized_svd(weight.to(compute), rank, n_iter=_RANDOMIZED_ITERATIONS)
    else:
        u, s, vh = exact_svd(weight.to(compute))
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)

"""SharedChannelLinear: a drop-in nn.Linear whose weight is K shared channels (SWSC) plus a low-rank residual.

    rows shared:    W = C[l] + U V       C (K, in_features),  l (out_features,) int32 in [0, K)
    columns shared: W = C[:, l] + U V    C (out_features, K), l (in_features,) int32 in [0, K)

Forward: y = W x + b through `torch.ops.lowrank_ops.codebook_matmul`, which never materialises C[l] on the Triton
path (the codebook GEMV and the gather run fused with the residual).

state_dict keys (stable):
    codebook  (K, in_features) for rows, (out_features, K) for columns
    index     (out_features,) / (in_features,) int32, a buffer; checked to lie in [0, K) whenever a state dict is
              loaded (the forward does not check: that would synchronise the GPU)
    v, u      (rank, in_features), (out_features, rank): only when rank > 0
    bias      (out_features,): only when bias=True
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowrank_ops.formats import bits_per_weight, check_clusters, check_shared, shared_weight
from lowrank_ops.modules._base_residual import check_residual_parts, copy_residual_parts, dense_linear
from lowrank_ops.modules.compressed import CompressedLinear, entry_choice, entry_int
from lowrank_ops.ops.codebook_matmul import codebook_matmul
from lowrank_ops.rank import validate_rank


class SharedChannelLinear(CompressedLinear):
    """y = (C[l] + U V) x + b (rows shared) or (C[:, l] + U V) x + b (columns shared).

    Args: in_features, out_features, clusters K (1 <= K <= the number of shared channels), rank r of the residual
    (0: none), shared "rows" | "columns", bias, dtype, device. Fresh modules hold a random codebook with
    nn.Linear's init variance and index i -> i mod K; use `from_parts` to hold a fitted codebook.
    """

    def __init__(self, in_features: int, out_features: int, clusters: int, rank: int = 0, shared: str = "rows",
                 bias: bool = True, dtype=None, device=None):  # fmt: skip
        super().__init__()
        where = "SharedChannelLinear"
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}: {name}={value!r} must be an int >= 1")
        check_shared(shared, where)
        check_clusters(clusters, out_features, in_features, shared, where)
        if rank != 0:
            validate_rank(rank, out_features, in_features, where)
        self.in_features, self.out_features = in_features, out_features
        self.clusters, self.rank, self.shared = clusters, rank, shared
        factory = {"dtype": dtype, "device": device}
        channels = out_features if shared == "rows" else in_features
        codebook_shape = (clusters, in_features) if shared == "rows" else (out_features, clusters)
        self.codebook = nn.Parameter(torch.empty(codebook_shape, **factory))
        self.register_buffer("index", torch.arange(channels, dtype=torch.int32, device=device) % clusters)
        if rank > 0:
            self.v = nn.Parameter(torch.empty(rank, in_features, **factory))
            self.u = nn.Parameter(torch.zeros(out_features, rank, **factory))
        else:
            self.v = self.u = None
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's U(-1/sqrt(n), 1/sqrt(n))
        with torch.no_grad():
            for t in (self.codebook, self.v, self.bias):
                if t is not None and t.device.type != "meta":
                    t.uniform_(-bound, bound)
        self.register_load_state_dict_post_hook(_check_loaded_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return codebook_matmul(x, self.codebook, self.index, self.v, self.u, self.bias, shared=self.shared)

    # ------------------------------------------------------------------------------------------------------------

    def check_index(self, where: str = "SharedChannelLinear") -> None:
        """Raise ValueError unless every index lies in [0, clusters) (the kernels do not bounds-check)."""
        if self.index.device.type == "meta" or self.index.numel() == 0:
            return
        low, high = int(self.index.min()), int(self.index.max())
        if low < 0 or high >= self.clusters:
            bad = ((self.index < 0) | (self.index >= self.clusters)).nonzero()[0].item()
            raise ValueError(
                f"{where}: index[{bad}]={int(self.index[bad])} is outside [0, {self.clusters}) (range found: "
                f"[{low}, {high}]); the file or tensors are corrupt or were written for another codebook"
            )

    @property
    def storage_bytes(self) -> int:
        """Bytes of the stored weight: codebook + index + residual factors (bias excluded)."""
        tensors = [self.codebook, self.index] + ([self.u, self.v] if self.rank else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def bits_per_weight(self) -> float:
        """8 * storage_bytes / (out_features * in_features), as `formats.bits_per_weight` counts it."""
        return self.bits_per_weight_at(8 * self.codebook.element_size())

    def bits_per_weight_at(self, value_bits: int) -> float:
        """bits_per_weight with codebook and factor values counted at `value_bits` (int32 index as stored)."""
        return bits_per_weight(self.out_features, self.in_features, self.clusters, self.rank, self.shared, value_bits)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, shared={self.shared!r}, "
            f"clusters={self.clusters}, rank={self.rank}, bias={self.bias is not None}, "
            f"bits_per_weight={self.bits_per_weight:.3f}"
        )

    def shared_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """C[l] or C[:, l] (out_features, in_features) in `dtype` (default: the codebook's)."""
        return shared_weight(self.codebook.detach(), self.index, self.shared).to(dtype or self.codebook.dtype)

    @classmethod
    def from_parts(
        cls,
        codebook: torch.Tensor,
        index: torch.Tensor,
        shared: str = "rows",
        u: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> SharedChannelLinear:
        """A module holding codebook, index (any integer dtype, checked to lie in [0, K)), and the optional residual
        U (m, r), V (r, n) and bias (m,), all cast to the codebook's dtype and moved to its device."""
        where = "SharedChannelLinear.from_parts"
        check_shared(shared, where)
        for name, t in (("codebook", codebook), ("u", u), ("v", v), ("bias", bias)):
            if t is not None and (not isinstance(t, torch.Tensor) or not t.is_floating_point()):
                raise TypeError(f"{where}: {name} must be a floating torch.Tensor, got {type(t).__name__}")
        if not isinstance(index, torch.Tensor) or index.is_floating_point() or index.is_complex():
            raise TypeError(f"{where}: index must be an integer torch.Tensor")
        if codebook.dim() != 2 or index.dim() != 1:
            raise ValueError(f"{where}: codebook.shape={tuple(codebook.shape)} must be 2-D and "
                             f"index.shape={tuple(index.shape)} 1-D")  # fmt: skip
        if shared == "rows":
            (clusters, n), m = codebook.shape, index.shape[0]
        else:
            (m, clusters), n = codebook.shape, index.shape[0]
        rank = check_residual_parts(u, v, bias, m, n, where)
        module = cls(n, m, clusters, rank, shared, bias=bias is not None, dtype=codebook.dtype,
                     device=codebook.device)  # fmt: skip
        with torch.no_grad():
            module.codebook.copy_(codebook.detach())
            module.index.copy_(index.detach().to(torch.int32))
        copy_residual_parts(module, u, v, bias)
        module.check_index(where)
        return module

    def check_loaded(self, where: str) -> None:
        super().check_loaded(where)
        self.check_index(where)

    @classmethod
    def check_manifest_entry(cls, name: str, entry: dict, where: str = "load_compressed") -> None:
        super().check_manifest_entry(name, entry, where)
        m, n = entry["out_features"], entry["in_features"]
        shared = entry_choice(entry, "shared", name, where, ("rows", "columns"))
        entry_int(entry, "clusters", name, where, 1, m if shared == "rows" else n)
        if entry["rank"]:
            entry_int(entry, "rank", name, where, 0, min(m, n))

    def _manifest_fields(self) -> dict:
        return {"shared": str(self.shared), "clusters": self.clusters}

    @classmethod
    def _empty(cls, name: str, entry: dict) -> SharedChannelLinear:  # the index range is checked on load
        return cls(entry["in_features"], entry["out_features"], entry["clusters"], entry["rank"], entry["shared"],
                   bias=entry["bias"])  # fmt: skip

    def to_linear(self, residual: bool = True) -> nn.Linear:
        """The dense layer with W = W_shared + U V (computed in float32 at least, cast to the module's dtype);
        residual=False: W = W_shared."""
        compute = torch.promote_types(self.codebook.dtype, torch.float32)
        return dense_linear(self, self.shared_weight(compute), self.codebook.dtype, residual)


def _check_loaded_index(module: SharedChannelLinear, incompatible_keys) -> None:
    module.check_index("SharedChannelLinear.load_state_dict")

"""Streaming statistics of a layer's inputs, the object calibration code fills.

For inputs x (..., n) seen over any number of batches, with X (T, n) all T tokens stacked:

    token_count = T
    mean_abs    = (1 / T) sum_t |X_t|         (n,)     ASVD's per-channel scale (raised to alpha by the caller)
    gram        = X^T X = sum_t X_t^T X_t     (n, n)   whitening / EoRA statistic (an unnormalised sum; scaling G
                                                         does not change any whitened factor)

Precision: the Gram is accumulated, and each batch's product X_b^T X_b computed, in `gram_dtype` (float64 by
default: fp64 products of fp16/bf16/fp32 inputs are exact, so only the summation rounds, at ~1e-16; float32 sums
round at ~1e-7 and, on CUDA, follow torch's global TF32 matmul setting). mean_abs is always summed in float64.

Memory: with `offload_to_cpu=True` the accumulators live in CPU memory; each batch's product is computed on the
batch's device and added on the CPU (one n x n transfer per update). Batches are processed in chunks of
`chunk_tokens` rows so the float64 copy of a long batch stays bounded.
"""

from __future__ import annotations

import torch

_GRAM_DTYPES = (torch.float32, torch.float64)


class InputStatistics:
    """Accumulates token count, mean |x| per channel and optionally the Gram X^T X of inputs x (..., n_features).

    Args:
        n_features: n, the size of the last dimension of every x.
        gram: also accumulate X^T X (n^2 memory); False keeps only token_count and mean_abs.
        gram_dtype: float64 (default) or float32, for the Gram's products and sum.
        device: where the accumulators live; None -> the device of the first batch (CPU with offload_to_cpu).
        offload_to_cpu: keep the accumulators on the CPU, compute each batch's product on the batch's device.
        name: used in error messages (e.g. the module name the statistics belong to).
        check_finite: reject batches with NaN/Inf (one device sync per update).
        chunk_tokens: rows per product; bounds the float64 working copy of a batch.
    """

    def __init__(
        self,
        n_features: int,
        *,
        gram: bool = True,
        gram_dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        offload_to_cpu: bool = False,
        name: str | None = None,
        check_finite: bool = True,
        chunk_tokens: int = 8192,
    ):
        where = self._where_for(name)
        if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
            raise ValueError(f"{where}: n_features={n_features!r} must be an int >= 1")
        if gram_dtype not in _GRAM_DTYPES:
            raise ValueError(f"{where}: gram_dtype={gram_dtype} must be torch.float64 or torch.float32")
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"{where}: chunk_tokens={chunk_tokens!r} must be an int >= 1")
        if offload_to_cpu and device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"{where}: offload_to_cpu=True keeps accumulators on the CPU, but device={device!r}")
        self.n_features = n_features
        self.track_gram = bool(gram)
        self.gram_dtype = gram_dtype
        self.offload_to_cpu = bool(offload_to_cpu)
        self.name = name
        self.check_finite = bool(check_finite)
        self.chunk_tokens = chunk_tokens
        self._device = torch.device("cpu") if offload_to_cpu else (None if device is None else torch.device(device))
        self._token_count = 0
        self._n_updates = 0
        self._abs_sum: torch.Tensor | None = None
        self._gram: torch.Tensor | None = None

    @staticmethod
    def _where_for(name: str | None) -> str:
        return "InputStatistics" if name is None else f"InputStatistics({name!r})"

    @property
    def _where(self) -> str:
        return self._where_for(self.name)

    @property
    def device(self) -> torch.device | None:
        """Where the accumulators live (None until the first update when no device was given)."""
        return self._device

    @property
    def token_count(self) -> int:
        """T, the number of tokens (rows of X) seen so far."""
        return self._token_count

    @property
    def n_updates(self) -> int:
        """Number of `update` calls that carried at least one token."""
        return self._n_updates

    def _allocate(self, device: torch.device) -> None:
        if self._device is None:
            self._device = device
        if self._abs_sum is None:
            self._abs_sum = torch.zeros(self.n_features, dtype=torch.float64, device=self._device)
            if self.track_gram:
                n = self.n_features
                self._gram = torch.zeros(n, n, dtype=self.gram_dtype, device=self._device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add the tokens of x (..., n_features): every leading index is a token. Empty batches are ignored."""
        where = self._where
        batch = self._n_updates
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: update {batch}: x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{where}: update {batch}: x.dtype={x.dtype} must be a floating dtype")
        if x.ndim < 1 or x.shape[-1] != self.n_features:
            raise ValueError(
                f"{where}: update {batch}: x.shape={tuple(x.shape)} must end in n_features={self.n_features}"
            )
        if x.numel() == 0:
            return
        x = x.detach()
        if self.check_finite:
            bad = ~torch.isfinite(x)
            if bool(bad.any()):
                first = tuple(int(i) for i in bad.nonzero()[0].tolist())
                raise ValueError(
                    f"{where}: update {batch}: x contains NaN/Inf ({int(bad.sum())} entries, first at index {first}, "
                    f"x.shape={tuple(x.shape)})"
                )
        self._allocate(x.device)
        compute = x.device if self.offload_to_cpu else self._device
        rows = x.reshape(-1, self.n_features).to(compute)
        abs_sum = torch.zeros(self.n_features, dtype=torch.float64, device=compute)
        gram = None
        if self.track_gram:
            gram = torch.zeros(self.n_features, self.n_features, dtype=self.gram_dtype, device=compute)
        for chunk in rows.split(self.chunk_tokens):
            abs_sum += chunk.abs().sum(dim=0, dtype=torch.float64)
            if gram is not None:
                c = chunk.to(self.gram_dtype)
                gram.addmm_(c.mT, c)
        self._abs_sum += abs_sum.to(self._device)
        if gram is not None:
            self._gram += gram.to(self._device)
        self._token_count += rows.shape[0]
        self._n_updates += 1

    def _require_tokens(self, what: str) -> None:
        if self._token_count == 0:
            raise ValueError(f"{self._where}: no tokens accumulated yet; call update(x) before reading {what}")

    @property
    def mean_abs(self) -> torch.Tensor:
        """(1 / T) sum_t |x_t| per channel, float64 (n,)."""
        self._require_tokens("mean_abs")
        return self._abs_sum / self._token_count

    @property
    def gram(self) -> torch.Tensor:
        """X^T X (n, n) in gram_dtype: the accumulator itself (clone it before modifying it)."""
        if not self.track_gram:
            raise ValueError(f"{self._where}: created with gram=False; no Gram matrix was accumulated")
        self._require_tokens("gram")
        return self._gram

    def merge(self, other: InputStatistics) -> InputStatistics:
        """Add another accumulator's statistics into this one (e.g. from another device or process); returns self."""
        where = self._where
        if not isinstance(other, InputStatistics):
            raise TypeError(f"{where}: merge expects an InputStatistics, got {type(other).__name__}")
        if other.n_features != self.n_features or other.track_gram != self.track_gram:
            raise ValueError(
                f"{where}: cannot merge statistics of n_features={other.n_features}, gram={other.track_gram} into "
                f"n_features={self.n_features}, gram={self.track_gram}"
            )
        if other._token_count == 0:
            return self
        self._allocate(other._abs_sum.device)
        self._abs_sum += other._abs_sum.to(self._device)
        if self.track_gram:
            self._gram += other._gram.to(device=self._device, dtype=self.gram_dtype)
        self._token_count += other._token_count
        self._n_updates += other._n_updates
        return self

    def state_dict(self) -> dict:
        """Plain tensors and ints (torch.save-able); `from_state_dict` restores an equal accumulator."""
        return {
            "n_features": self.n_features,
            "token_count": self._token_count,
            "n_updates": self._n_updates,
            "abs_sum": self._abs_sum,
            "gram": self._gram,
            "track_gram": self.track_gram,
            "gram_dtype": str(self.gram_dtype).removeprefix("torch."),
            "name": self.name,
        }

    @classmethod
    def from_state_dict(cls, state: dict, *, device: torch.device | str | None = None) -> InputStatistics:
        """Inverse of `state_dict`; accumulators go to `device` (default: where they were saved from)."""
        gram_dtype = getattr(torch, state["gram_dtype"])
        stats = cls(
            state["n_features"], gram=state["track_gram"], gram_dtype=gram_dtype, device=device, name=state.get("name")
        )
        if state["abs_sum"] is not None:
            target = torch.device(device) if device is not None else state["abs_sum"].device
            stats._device = target
            stats._abs_sum = state["abs_sum"].to(target, torch.float64).clone()
            if stats.track_gram:
                stats._gram = state["gram"].to(target, gram_dtype).clone()
        stats._token_count = int(state["token_count"])
        stats._n_updates = int(state["n_updates"])
        return stats

    def __repr__(self) -> str:
        return (
            f"InputStatistics(name={self.name!r}, n_features={self.n_features}, tokens={self._token_count}, "
            f"gram={self.track_gram} ({str(self.gram_dtype).removeprefix('torch.')}), device={self._device})"
        )

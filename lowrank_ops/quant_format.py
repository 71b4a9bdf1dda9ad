"""Packed storage of a group-wise quantized weight W_hat (m, n), the base of `quant_lowrank_matmul`.

Quantizers produce unsigned codes q (m, n) in [0, 2^bits - 1], scales (m, G) and zero points (m, G), with
G = ceil(n / group_size) (the last group may be partial: n = 576 with group_size = 128 in SmolLM2), and
define the dequantised weight as

    W_hat[i, j] = (q[i, j] - zeros[i, j // group_size]) * scales[i, j // group_size]

`pack` turns them, once and offline, into the layout below; the op and its kernels read that layout
directly and never re-pack.

LAYOUT_VERSION = 1
- bits = 4 (and bits = 3, stored in the same 4-bit slots -- layout v1 has no dense 3-bit packing; 3-bit
  codes simply never use the top bit): qweight int32 (m, ceil(n / 8)). The code of column k sits at bits
  4 * (k % 8) .. 4 * (k % 8) + 3 of word k // 8 (column 8j in the low nibble of word j). n is padded to a
  multiple of 8 with zero codes; the padding is never read as weight (the kernels mask x beyond n).
  Little-endian consequence: viewed as uint8 (m, 4 * ceil(n / 8)), byte b holds columns 2b (low nibble) and
  2b + 1 (high nibble), i.e. the common "two per byte, low first" order.
  Why this order and not one interleaved for the kernel: the Triton kernels take a (rows, words) tile and
  extract sub-tile c = (word >> 4c) & 15, which holds columns 8j + c -- a plain 2-D tile with the words' own
  register layout, no reshape and no gather of the packed words -- and pair it with x's columns 8j + c
  (x is a few KB: a stride-8 load, or one contiguous load split in registers). The order also keeps every
  word inside one group, which lets the M = 1 kernel fold zero point and scale out of the per-code work.
  A candidate for a later layout version, to be decided by GPU measurements (kernels/quant_lowrank_matmul.py):
  interleave each 64-column block (word j holding columns j + 8c) so each thread's x columns are contiguous.
- bits = 8: qweight uint8 (m, n), the codes themselves.
- group_size: >= 1; a multiple of 8 when bits <= 4, so that a 32-bit word never straddles two groups.
- scales, zeros: (m, G), contiguous, stored in the activation dtype the layer runs in (fp16 / bf16, or fp32
  for fp32 layers). Why not fp32: at group 128 fp32 scale + zero cost 0.5 bit per weight against 0.25 in
  16 bits (4.5 vs 4.25 bits per weight, +6% bytes for a memory-bound decode kernel; +20% at group 32), and
  16-bit scales are what GPTQ / AWQ / torchao checkpoints ship. Zero points that are integers up to 256 are
  exact in fp16 and bf16; the kernels upcast both to fp32 and dequantise in fp32. The stored (rounded)
  scales and zeros DEFINE W_hat: compute any residual (EoRA's dW = W - W_hat) against `dequantize_packed`
  of the packed weight, not against the quantizer's unrounded values.

`PackedQuantWeight` carries the tensors with bits, group_size, the logical shape (m, n) and the layout
version; `check_packed` rejects a packed weight written with another layout version.
"""

from __future__ import annotations

import dataclasses

import torch

LAYOUT_VERSION = 1
SUPPORTED_BITS = (2, 3, 4, 8)  # codes of <= 4 bits live in 4-bit slots of int32 words; 8-bit codes in uint8
CODES_PER_INT32 = 8
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def container_bits(bits: int) -> int:
    """Bits of the slot a code occupies in the packed qweight: 4 for bits <= 4, 8 for bits = 8."""
    return 4 if bits <= 4 else 8


def num_groups(n: int, group_size: int) -> int:
    """G = ceil(n / group_size): scale / zero columns of an (m, n) weight (the last group may be partial)."""
    return -(-n // group_size)


def packed_width(n: int, bits: int) -> int:
    """qweight.shape[1] for n input features: ceil(n / 8) int32 words for bits <= 4, n bytes for bits = 8."""
    return -(-n // CODES_PER_INT32) if container_bits(bits) == 4 else n


def qweight_dtype(bits: int) -> torch.dtype:
    return torch.int32 if container_bits(bits) == 4 else torch.uint8


def check_format_args(what: str, bits, group_size) -> None:
    """bits in SUPPORTED_BITS and group_size >= 1 (a multiple of 8 for 4-bit slots), else TypeError / ValueError."""
    for name, value in (("bits", bits), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{what}: {name} must be an int, got {type(value).__name__} {value!r}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{what}: bits={bits} must be one of {SUPPORTED_BITS}")
    if group_size < 1:
        raise ValueError(f"{what}: group_size={group_size} must be >= 1")
    if container_bits(bits) == 4 and group_size % CODES_PER_INT32 != 0:
        raise ValueError(
            f"{what}: group_size={group_size} must be a multiple of {CODES_PER_INT32} for bits={bits} "
            f"(8 codes share an int32 word, which must not straddle two groups)"
        )


@dataclasses.dataclass
class PackedQuantWeight:
    """A group-wise quantized (m, n) weight in the layout of LAYOUT_VERSION (see the module docstring).

    qweight  int32 (m, ceil(n / 8)) for bits <= 4, uint8 (m, n) for bits = 8
    scales   (m, G) fp16 / bf16 / fp32
    zeros    (m, G) same dtype as scales
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int
    shape: tuple[int, int]
    layout_version: int = LAYOUT_VERSION

    def to(self, device: torch.device | str) -> PackedQuantWeight:
        """The same packed weight on `device` (dtypes unchanged)."""
        return dataclasses.replace(
            self, qweight=self.qweight.to(device), scales=self.scales.to(device), zeros=self.zeros.to(device)
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def check_packed(packed: PackedQuantWeight, what: str = "PackedQuantWeight") -> None:
    """Raise if `packed` has another layout version or inconsistent shapes / dtypes."""
    if not isinstance(packed, PackedQuantWeight):
        raise TypeError(f"{what}: expected a PackedQuantWeight, got {type(packed).__name__}")
    if packed.layout_version != LAYOUT_VERSION:
        raise ValueError(
            f"{what}: layout_version={packed.layout_version} is not this package's LAYOUT_VERSION={LAYOUT_VERSION}; "
            f"re-pack the weight with lowrank_ops.quant_format.pack"
        )
    check_format_args(what, packed.bits, packed.group_size)
    m, n = packed.shape
    want_q = (m, packed_width(n, packed.bits))
    if tuple(packed.qweight.shape) != want_q or packed.qweight.dtype != qweight_dtype(packed.bits):
        raise ValueError(
            f"{what}: qweight {packed.qweight.dtype} {tuple(packed.qweight.shape)} must be "
            f"{qweight_dtype(packed.bits)} {want_q} for shape={packed.shape}, bits={packed.bits}"
        )
    want_s = (m, num_groups(n, packed.group_size))
    for name, t in (("scales", packed.scales), ("zeros", packed.zeros)):
        if tuple(t.shape) != want_s:
            raise ValueError(f"{what}: {name}.shape={tuple(t.shape)} must be {want_s} (m, ceil(n / group_size))")
        if t.dtype not in SCALE_DTYPES:
            raise TypeError(f"{what}: {name}.dtype={t.dtype} must be one of {[str(d) for d in SCALE_DTYPES]}")
    if packed.zeros.dtype != packed.scales.dtype:
        raise TypeError(f"{what}: zeros.dtype={packed.zeros.dtype} must equal scales.dtype={packed.scales.dtype}")


def pack(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
) -> PackedQuantWeight:
    """Pack unsigned codes (m, n) with their scales / zeros (m, G) into LAYOUT_VERSION; done once, offline.

    `dtype` is the storage dtype of scales and zeros: the activation dtype of the layer (fp16 / bf16 / fp32).
    Raises if a code lies outside [0, 2^bits - 1] or the shapes disagree.
    """
    what = "quant_format.pack"
    check_format_args(what, bits, group_size)
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError(f"{what}: codes must be a 2-D tensor (m, n), got {getattr(codes, 'shape', type(codes))}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{what}: codes.dtype={codes.dtype} must be an integer dtype (uint8 preferred)")
    if dtype not in SCALE_DTYPES:
        raise TypeError(f"{what}: dtype={dtype} must be one of {[str(d) for d in SCALE_DTYPES]}")
    m, n = codes.shape
    if m < 1 or n < 1:
        raise ValueError(f"{what}: codes.shape={tuple(codes.shape)} must have m >= 1 and n >= 1")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 2**bits - 1):
        raise ValueError(
            f"{what}: codes span [{int(codes.min())}, {int(codes.max())}], outside [0, {2**bits - 1}] for bits={bits}"
        )
    want_s = (m, num_groups(n, group_size))
    for name, t in (("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want_s:
            raise ValueError(
                f"{what}: {name}.shape={tuple(getattr(t, 'shape', ()))} must be {want_s} (m, ceil(n / group_size))"
            )
        if t.device != codes.device:
            raise ValueError(f"{what}: {name} is on {t.device} but codes are on {codes.device}")

    qweight = codes.to(torch.uint8).contiguous() if container_bits(bits) == 8 else pack_fields(codes, 4)
    return PackedQuantWeight(
        qweight=qweight,
        scales=scales.detach().to(dtype).contiguous(),
        zeros=zeros.detach().to(dtype).contiguous(),
        bits=bits,
        group_size=group_size,
        shape=(m, n),
    )


def int32_words(words: torch.Tensor) -> torch.Tensor:
    """Words held as int64 in [0, 2^32), as contiguous int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def pack_fields(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-wide values (r, k) packed along dim 1 into int32 (r, ceil(k / (32 / bits))): value j at bits
    bits * (j % (32 / bits)) of word j // (32 / bits), low bits first, padding 0 -- layout v1's 4-bit qweight, and
    compressed-tensors' packed fields (`lowrank_ops.compressed_tensors_format`)."""
    per_word = 32 // bits
    rows, cols = values.shape
    words = -(-cols // per_word)
    padded = torch.zeros((rows, words * per_word), dtype=torch.int64, device=values.device)
    padded[:, :cols] = values.to(torch.int64)
    shifts = bits * torch.arange(per_word, dtype=torch.int64, device=values.device)
    return int32_words((padded.view(rows, words, per_word) << shifts).sum(-1))


def unpack_qweight(qweight: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The codes (m, n) uint8 of a packed qweight (inverse of the packing in `pack`)."""
    if container_bits(bits) == 8:
        return qweight[:, :n].to(torch.uint8)
    m, width = qweight.shape
    shifts = 4 * torch.arange(CODES_PER_INT32, device=qweight.device, dtype=torch.int32)
    codes = (qweight.unsqueeze(-1) >> shifts) & 0xF  # arithmetic shift of negative words: the mask drops the sign
    return codes.reshape(m, width * CODES_PER_INT32)[:, :n].to(torch.uint8)


def unpack_codes(packed: PackedQuantWeight) -> torch.Tensor:
    """The codes (m, n) uint8 of a PackedQuantWeight."""
    check_packed(packed, "quant_format.unpack_codes")
    return unpack_qweight(packed.qweight, packed.bits, packed.shape[1])


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """W_hat (m, n) = (codes - zeros[:, j // g]) * scales[:, j // g] from unpacked codes (m, n).

    Computed in float64 when `dtype` is float64, else in float32 and rounded once to `dtype`
    (default: scales.dtype). The one implementation of the format's formula.
    """
    dtype = scales.dtype if dtype is None else dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    m, n = codes.shape
    groups = scales.shape[1]
    pad = groups * group_size - n
    grouped = torch.nn.functional.pad(codes.to(compute), (0, pad)).view(m, groups, group_size)
    w = (grouped - zeros.to(compute).unsqueeze(-1)) * scales.to(compute).unsqueeze(-1)
    return w.view(m, groups * group_size)[:, :n].to(dtype)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    n: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W_hat (m, n) from the packed qweight: the torch reference of every kernel's dequantisation."""
    return dequantize_codes(unpack_qweight(qweight, bits, n), scales, zeros, group_size, dtype)


def dequantize_packed(packed: PackedQuantWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W_hat (m, n) of a PackedQuantWeight in `dtype` (default: the scales' dtype); see `dequantize`."""
    check_packed(packed, "quant_format.dequantize_packed")
    return dequantize(
        packed.qweight, packed.scales, packed.zeros, packed.bits, packed.group_size, packed.shape[1], dtype
    )


# ---------------------------------------------------------------------------------------------------- layout v2
# The fragment-ordered layout of the int4 kernel v2 (csrc/quant_lowrank_decode_v2.cu, docs/INT4_V2.md): a kernel
# layout derived from version 1, exactly and offline, by `to_layout_v2`. Saved models stay version 1 (every file
# keeps loading); a layer converts when the v2 kernel is chosen for it. v2 is not chosen by AUTO until a GPU has
# measured it.
#   qweight int32 (NB, KB, 32, 4), NB = ceil(m / 16), KB = ceil(n / 64), padded with zero codes. Word j of lane
#     l = 4 g + t in (n16 block nb, k64 block kb) holds the codes of rows (outputs) nb 16 + g and nb 16 + 8 + g at
#     columns k = kb 64 + 16 j + {2t, 2t + 1, 2t + 8, 2t + 9}: nibble 2 h + s + 4 e is row nb 16 + 8 h + g, column
#     kb 64 + 16 j + 8 s + 2 t + e -- so that csrc/int4_dequant.cuh's pairs (nibbles i, i + 4) are the mma B fragments.
#   scales (G, NB32, 32, 8), NB32 = ceil(m / 32), in the activation dtype, and zeros (G, NB32, 32, 4) uint8: what
#     lane l = 4 g + t of the warp owning output columns 32 w .. 32 w + 31 needs per group, as one 16-byte and one
#     4-byte load: scale 4 b + 2 h + e is column 32 w + 16 b + 8 h + 2 t + e (its mma accumulator columns), zero
#     2 b + h is column 32 w + 16 b + 8 h + g (its B-fragment column); columns past m: zero. Zeros must be integers
#     0 .. 15 (folded into the kernel's dequantisation constants), group_size a multiple of 16.
LAYOUT_V2 = 2


def _v2_view(n_blocks: int, k_blocks: int) -> tuple[int, ...]:
    """(nb, h, g, kb, j, s, t, e): a padded (16 NB, 64 KB) code matrix split along layout v2's fields."""
    return (n_blocks, 2, 8, k_blocks, 4, 2, 4, 2)


def _v2_shifts(device) -> torch.Tensor:
    h = torch.arange(2, device=device).view(1, 2, 1, 1, 1, 1, 1, 1)
    s = torch.arange(2, device=device).view(1, 1, 1, 1, 1, 2, 1, 1)
    e = torch.arange(2, device=device).view(1, 1, 1, 1, 1, 1, 1, 2)
    return 4 * (2 * h + s + 4 * e)


def _v2_group_columns(warps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Output columns of layout v2's per-lane scale (warps, 32, 8) and zero (warps, 32, 4) slots."""
    w = torch.arange(warps, device=device).view(-1, 1, 1)
    lane = torch.arange(32, device=device).view(1, -1, 1)
    i = torch.arange(8, device=device).view(1, 1, -1)  # 4 b + 2 h + e
    scale = 32 * w + 16 * (i // 4) + 8 * (i // 2 % 2) + 2 * (lane % 4) + i % 2
    j = torch.arange(4, device=device).view(1, 1, -1)  # 2 b + h
    zero = 32 * w + 16 * (j // 2) + 8 * (j % 2) + lane // 4
    return scale, zero


def _gather_columns(t: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """(G, *columns.shape): t (m, G) at the given output columns, zero past m."""
    padded = torch.zeros(int(columns.max()) + 1, t.shape[1], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    return padded[columns].movedim(-1, 0).contiguous()


def to_layout_v2(packed: PackedQuantWeight) -> PackedQuantWeight:
    """The version-1 `packed` (bits <= 4) in layout v2; exact (`from_layout_v2` gives it back)."""
    check_packed(packed, "quant_format.to_layout_v2")
    m, n = packed.shape
    if container_bits(packed.bits) != 4:
        raise ValueError(f"to_layout_v2: bits={packed.bits}: layout v2 holds codes of <= 4 bits")
    if packed.group_size % 16 != 0:
        raise ValueError(f"to_layout_v2: group_size={packed.group_size} must be a multiple of 16 (the v2 kernel "
                         "scales whole k16 tensor-core steps)")  # fmt: skip
    zeros = packed.zeros.double()
    if not bool(((zeros == zeros.round()) & (zeros >= 0) & (zeros <= 15)).all()):
        raise ValueError("to_layout_v2: the zero points must be integers in 0 .. 15 (the v2 kernel folds them into its "
                         "dequantisation constants)")  # fmt: skip
    n_blocks, k_blocks = -(-m // 16), -(-n // 64)
    codes = torch.zeros(16 * n_blocks, 64 * k_blocks, dtype=torch.int64, device=packed.qweight.device)
    codes[:m, :n] = unpack_codes(packed).long()
    words = (codes.view(_v2_view(n_blocks, k_blocks)) << _v2_shifts(codes.device)).sum(dim=(1, 5, 7))
    words = words.permute(0, 2, 1, 4, 3).reshape(n_blocks, k_blocks, 32, 4)  # (nb, kb, g, t, j) -> lane = 4 g + t
    words = int32_words(words)
    scale_columns, zero_columns = _v2_group_columns(-(-m // 32), codes.device)
    return dataclasses.replace(packed, qweight=words, scales=_gather_columns(packed.scales, scale_columns),
                               zeros=_gather_columns(packed.zeros, zero_columns).to(torch.uint8),
                               layout_version=LAYOUT_V2)  # fmt: skip


def from_layout_v2(packed: PackedQuantWeight) -> PackedQuantWeight:
    """The version-1 packed weight of a layout-v2 one (the inverse of `to_layout_v2`)."""
    if packed.layout_version != LAYOUT_V2:
        raise ValueError(f"from_layout_v2: layout_version={packed.layout_version}, expected {LAYOUT_V2}")
    m, n = packed.shape
    n_blocks, k_blocks = packed.qweight.shape[:2]
    words = packed.qweight.long() & 0xFFFFFFFF
    words = words.view(n_blocks, k_blocks, 8, 4, 4).permute(0, 2, 1, 4, 3)  # (nb, g, kb, j, t)
    words = words.reshape(n_blocks, 1, 8, k_blocks, 4, 1, 4, 1)
    codes = ((words >> _v2_shifts(words.device)) & 0xF).reshape(16 * n_blocks, 64 * k_blocks)[:m, :n]
    groups, warps = packed.scales.shape[:2]
    scale_columns, zero_columns = _v2_group_columns(warps, words.device)
    scales = torch.empty(32 * warps, groups, dtype=packed.scales.dtype, device=words.device)
    zeros = torch.empty(32 * warps, groups, dtype=packed.scales.dtype, device=words.device)
    scales[scale_columns.reshape(-1)] = packed.scales.reshape(groups, -1).t()
    zeros[zero_columns.reshape(-1)] = packed.zeros.reshape(groups, -1).t().to(packed.scales.dtype)
    return pack(codes.to(torch.uint8), scales[:m], zeros[:m], packed.bits, packed.group_size,
                packed.scales.dtype)  # fmt: skip

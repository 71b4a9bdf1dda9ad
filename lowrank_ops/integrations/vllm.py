"""vLLM plugin: serve a model saved by lowrank-ops with vLLM (quantization method "lowrank_ops").

Loaded by vLLM in every process through the entry point `vllm.general_plugins: lowrank_ops` (pyproject.toml), which
calls `register()`. A saved model's config.json carries

    "quantization_config": {"quant_method": "lowrank_ops", "format_version": 1,
                            "modules": {<Hugging Face module name>: <manifest entry>, ...}, "config": {...}}

and model.safetensors its tensors under the Hugging Face module names, so `vllm serve DIR` needs no flag. Modules
absent from "modules" are ordinary dense layers. Only this file imports vllm; `import lowrank_ops` never does.

Per layer (`LowRankOpsLinearMethod`), one SHARD per Hugging Face module: a plain layer has one; vLLM's merged layers
have several (QKVParallelLinear: q, k, v; MergedColumnParallelLinear: gate, up). Every shard keeps its own kind and
rank -- dense, LowRankLinear (U V), QuantLowRankLinear (packed int base + U V), SparseLowRankLinear (2:4 base stored
dense + U V), SharedChannelLinear (codebook + index + U V) -- and `apply` runs one op per shard and concatenates the
outputs. Why not concatenated factors: the shards share x, so [V_q; V_k; V_v] would make one shrink GEMM, but the
expand then needs a block-diagonal U (sum of m_i times sum of r_i, mostly zeros) or a per-shard expand anyway, the
bases cannot be concatenated when the shards differ in kind, bits or group size, and the fused kernels (shrink,
dequantising GEMV and expand in one launch chain) take one (V, U) pair. The price is one launch chain per shard
and one concatenation of the outputs.

Storage: vLLM's loader looks a checkpoint tensor up by name after renaming q_proj -> qkv_proj (shard "q"), so a
merged layer has ONE parameter per tensor name ("u", "v", "weight", "qweight", "scales", "zeros", "codebook",
"index"): a flat 1-D buffer holding every shard's local tensor one after the other (`TensorPart.offset`), the
shards' tensors being views of it. The layer's bias is vLLM's own parameter.

Tensor parallelism, as vLLM's LoRA layers split A (= V) and B (= U):
- column-parallel (QKV, gate/up; output rows split): U, the base's rows (weight, qweight, scales, zeros), a
  rows-shared index or a columns-shared codebook are split by output rows; V is replicated. With more ranks than KV
  heads, k and v rows follow vLLM's KV-head replication (rank // replicas).
- row-parallel (o, down; input columns split): V, the base's columns, a rows-shared codebook or a columns-shared
  index are split by input columns; U is replicated; the layer's all-reduce sums the partial outputs
  U (V_t x_t) + W_t x_t, and vLLM adds the bias on rank 0 only. A packed base splits only on whole int32 words
  (8 columns) and whole quantization groups: each rank's column range must start and end on a group boundary.
`tensor_parts` is that rule as a pure function (unit-tested in tests/test_vllm_plugin.py).

Dtypes: factors, dense bases and codebooks take the model's dtype (vLLM's params_dtype); scales and zeros too when
they were saved in it, else float32 (the op accepts float32 scales with any x), so W_hat is exactly the saved one;
qweight and index keep their integer dtypes (checked on load).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethodBase,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
from vllm.model_executor.utils import set_weight_attrs

from lowrank_ops.formats import two_of_four_violation

# the ops' Python functions: they take the custom op under torch.compile and with autograd, and run eager inference
# calls directly (ops/_checks.eager_without_autograd; the CPU int4 backend's repeated-call path)
from lowrank_ops.ops import codebook_matmul, lowrank_matmul, quant_lowrank_matmul
from lowrank_ops.ops.codebook_matmul import segment_sum
from lowrank_ops.quant_format import CODES_PER_INT32, LAYOUT_VERSION, container_bits, num_groups, packed_width

QUANT_METHOD = "lowrank_ops"
FORMAT_VERSION = 1
KINDS = ("LowRankLinear", "QuantLowRankLinear", "SparseLowRankLinear", "SharedChannelLinear")
_QKV_SHARDS = ("q", "k", "v")


# ---------------------------------------------------------------------------------------------------------------
# Shard math: which part of each saved tensor a tensor-parallel rank holds (pure, no vLLM state)


@dataclasses.dataclass(frozen=True)
class TensorPart:
    """The part of one saved tensor that one rank holds: the saved tensor's shape, and along `dim` (None: the whole
    tensor) the slice [start, start + length). `shape` is the local shape; `offset` its place in the layer's flat
    buffer of that name (set when the layer's shards are laid out)."""

    full_shape: tuple[int, ...]
    dim: int | None
    start: int
    length: int
    dtype: torch.dtype | None  # None: a float tensor, stored in the layer's float dtype
    offset: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.full_shape
        return tuple(self.length if d == self.dim else s for d, s in enumerate(self.full_shape))

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def take(self, saved: torch.Tensor) -> torch.Tensor:
        """This rank's part of the saved tensor (a view)."""
        return saved if self.dim is None else saved.narrow(self.dim, self.start, self.length)


def _split(layer: str, name: str, full: int, start: int, length: int, unit: int, what: str) -> tuple[int, int]:
    """[start, start + length) of a dimension of `full` features, in storage units of `unit` features (8 codes per
    int32 word, group_size columns per scale): (first unit, number of units). The range must start on a unit
    boundary and end on one or at the end of the dimension (where the last unit may be partial)."""
    end = start + length
    if start % unit or (end % unit and end != full):
        raise ValueError(f"lowrank_ops vLLM plugin: {layer}.{name}: this rank's input columns [{start}, {end}) of "
                         f"{full} must start and end on a multiple of {unit} ({what}) to split the packed base "
                         f"across tensor-parallel ranks; use a tensor-parallel size that divides "
                         f"{full} // {unit} (or save with a smaller group_size)")  # fmt: skip
    return start // unit, -(-end // unit) - start // unit


def tensor_parts(layer: str, entry: dict | None, out_range: tuple[int, int], in_range: tuple[int, int],
                 out_features: int, in_features: int) -> dict[str, TensorPart]:  # fmt: skip
    """What one rank holds of each saved tensor of one shard (module `layer`, manifest `entry`, None for a dense
    layer): the rank computes output rows [out_range[0], + out_range[1]) from input columns [in_range[0], +
    in_range[1]) of the (out_features, in_features) weight. Column-parallel layers pass a part of the rows and all
    columns, row-parallel ones all rows and a part of the columns. Raises ValueError for an entry this plugin does
    not read or a split the storage does not allow."""
    o0, ol = out_range
    i0, il = in_range
    m, n = out_features, in_features
    parts: dict[str, TensorPart] = {}

    def add(name, shape, dtype=None, out_dim=None, in_dim=None, in_unit=1, what=""):
        if out_dim is not None and (o0, ol) != (0, m):
            parts[name] = TensorPart(tuple(shape), out_dim, o0, ol, dtype)
        elif in_dim is not None and (i0, il) != (0, n):
            start, count = _split(layer, name, n, i0, il, in_unit, what) if in_unit > 1 else (i0, il)
            parts[name] = TensorPart(tuple(shape), in_dim, start, count, dtype)
        else:
            parts[name] = TensorPart(tuple(shape), None, 0, 0, dtype)

    kind = None if entry is None else entry.get("module")
    if kind is None:
        add("weight", (m, n), out_dim=0, in_dim=1)
        return parts
    if kind not in KINDS:
        raise ValueError(f"lowrank_ops vLLM plugin: {layer} has module {kind!r}; this plugin serves {list(KINDS)}")
    if (entry["out_features"], entry["in_features"]) != (m, n):
        raise ValueError(f"lowrank_ops vLLM plugin: {layer} is saved as ({entry['out_features']}, "
                         f"{entry['in_features']}) (out, in) but vLLM's layer has ({m}, {n})")  # fmt: skip
    if entry.get("dense_class", "Linear") != "Linear":
        raise ValueError(f"lowrank_ops vLLM plugin: {layer} replaced a {entry['dense_class']}; this plugin serves "
                         "layers that replaced nn.Linear (a Conv1D weight is stored transposed)")  # fmt: skip
    if entry.get("coefficients"):
        raise ValueError(f"lowrank_ops vLLM plugin: {layer} carries unfolded coefficients s; fold them "
                         "(LowRankLinear.fold_coefficients) before saving")  # fmt: skip
    rank = entry["rank"]
    if kind == "QuantLowRankLinear":
        if entry.get("layout_version") != LAYOUT_VERSION:
            raise ValueError(f"lowrank_ops vLLM plugin: {layer} has layout_version={entry.get('layout_version')}, "
                             f"this plugin reads {LAYOUT_VERSION}")  # fmt: skip
        bits, group = entry["bits"], entry["group_size"]
        word = CODES_PER_INT32 if container_bits(bits) == 4 else 1
        qdtype = torch.int32 if word > 1 else torch.uint8
        add("qweight", (m, packed_width(n, bits)), qdtype, 0, 1, word, f"{word} codes per int32 word")
        for name in ("scales", "zeros"):
            add(name, (m, num_groups(n, group)), None, 0, 1, group, f"group_size={group}")
    elif kind == "SparseLowRankLinear":
        if entry.get("pattern") != "2:4" or entry.get("storage", "dense") != "dense":
            raise ValueError(f"lowrank_ops vLLM plugin: {layer} has pattern={entry.get('pattern')!r}, "
                             f"storage={entry.get('storage')!r}; this plugin reads '2:4' stored dense")  # fmt: skip
        add("weight", (m, n), out_dim=0, in_dim=1)
    elif kind == "SharedChannelLinear":
        clusters, shared = entry["clusters"], entry["shared"]
        if shared == "rows":  # W = C[index]: C (K, n), index (m,)
            add("codebook", (clusters, n), in_dim=1)
            add("index", (m,), torch.int32, out_dim=0)
        elif shared == "columns":  # W = C[:, index]: C (m, K), index (n,)
            add("codebook", (m, clusters), out_dim=0)
            add("index", (n,), torch.int32, in_dim=0)
        else:
            raise ValueError(f"lowrank_ops vLLM plugin: {layer} has shared={shared!r}, expected 'rows' or 'columns'")
    if rank > 0:
        add("u", (m, rank), out_dim=0)  # LoRA's B: split with the output rows, replicated across input splits
        add("v", (rank, n), in_dim=1)  # LoRA's A: split with the input columns, replicated across output splits
    return parts


def shard_ranges(layer: nn.Module, local_out_sizes: list[int], local_in: int) -> list[tuple[tuple, tuple, int, int]]:
    """Per shard of a vLLM linear layer: (out_range, in_range, out_features, in_features) of this rank, following
    vLLM's own weight loaders (column-parallel: rows split, KV rows replicated beyond the KV heads; row-parallel:
    columns split; anything else: replicated)."""
    tp_rank, tp_size = getattr(layer, "tp_rank", 0), getattr(layer, "tp_size", 1)
    if isinstance(layer, RowParallelLinear):
        (m,) = local_out_sizes
        return [((0, m), (tp_rank * local_in, local_in), m, local_in * tp_size)]
    ranges = []
    for i, local_m in enumerate(local_out_sizes):
        if isinstance(layer, ColumnParallelLinear):
            replicas = getattr(layer, "num_kv_head_replicas", 1) if isinstance(layer, QKVParallelLinear) and i else 1
            owners = tp_size // replicas
            ranges.append(((tp_rank // replicas * local_m, local_m), (0, local_in), local_m * owners, local_in))
        else:
            ranges.append(((0, local_m), (0, local_in), local_m, local_in))
    return ranges


# ---------------------------------------------------------------------------------------------------------------
# vLLM classes


@register_quantization_config(QUANT_METHOD)
class LowRankOpsConfig(QuantizationConfig):
    """The quantization_config of a model saved by lowrank-ops: the manifest entry of every compressed module."""

    def __init__(self, modules: dict[str, dict], config: dict | None = None):
        super().__init__()
        self.modules = dict(modules)
        self.compression_config = config

    def __repr__(self) -> str:
        return f"LowRankOpsConfig({len(self.modules)} compressed modules)"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton kernels use bf16 tl.dot (Ampere); the torch paths run anywhere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LowRankOpsConfig:
        where = "lowrank_ops vLLM plugin"
        if config.get("quant_method") != QUANT_METHOD:
            raise ValueError(f"{where}: quant_method={config.get('quant_method')!r}, expected {QUANT_METHOD!r}")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}: quantization_config has format_version={config.get('format_version')}, "
                             f"this plugin reads {FORMAT_VERSION}")  # fmt: skip
        modules = config.get("modules")
        if not isinstance(modules, dict) or not modules:
            raise ValueError(f"{where}: quantization_config['modules'] must be a non-empty dict of module name -> "
                             f"manifest entry, got {type(modules).__name__}")  # fmt: skip
        for name, entry in modules.items():
            if not isinstance(entry, dict) or entry.get("module") not in KINDS:
                kind = entry.get("module") if isinstance(entry, dict) else entry
                raise ValueError(f"{where}: module {name} is {kind!r}; this plugin serves {list(KINDS)}")
        return cls(modules, config.get("config"))

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        # vLLM hands the rename-only mapper (no q_proj -> qkv_proj stacking), so names stay per shard
        self.modules = hf_to_vllm_mapper.apply_dict(self.modules)

    def shard_names(self, prefix: str) -> list[str]:
        """The Hugging Face module names behind vLLM layer `prefix` (several for a merged layer)."""
        parent, _, leaf = prefix.rpartition(".")
        packed = self.packed_modules_mapping.get(leaf)
        if not packed:
            return [prefix]
        return [f"{parent}.{name}" if parent else name for name in packed]

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        names = self.shard_names(prefix)
        if not any(name in self.modules for name in names):
            return UnquantizedLinearMethod()
        return LowRankOpsLinearMethod([(name, self.modules.get(name)) for name in names])


class LowRankOpsLinearMethod(LinearMethodBase):
    """Weights, loading and forward of one vLLM linear layer whose shards are lowrank-ops modules (or dense)."""

    def __init__(self, shards: list[tuple[str, dict | None]]):
        self.shards = shards

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):  # fmt: skip
        names = [name for name, _ in self.shards]
        if len(output_partition_sizes) != len(self.shards):
            raise ValueError(f"lowrank_ops vLLM plugin: the vLLM layer of {names} has {len(output_partition_sizes)} "
                             f"output parts but the model's packed-modules mapping names {len(self.shards)} "
                             "modules")  # fmt: skip
        ranges = shard_ranges(layer, output_partition_sizes, input_size_per_partition)
        parts, totals, dtypes = [], {}, {}
        for (name, entry), (out_range, in_range, m, n) in zip(self.shards, ranges):
            shard = tensor_parts(name, entry, out_range, in_range, m, n)
            for tensor, part in shard.items():
                dtype = part.dtype or self._float_dtype(tensor, entry, params_dtype)
                if dtypes.setdefault(tensor, dtype) != dtype:  # one flat buffer per name holds one dtype
                    if tensor not in ("scales", "zeros"):
                        raise ValueError(f"lowrank_ops vLLM plugin: the modules {names} merged into one vLLM layer "
                                         f"store {tensor} as {dtypes[tensor]} and {dtype}; save them with bit widths "
                                         "of one container (<= 4 bits or 8 bits)")  # fmt: skip
                    dtypes[tensor] = torch.float32  # scales saved in different dtypes: float32 holds both exactly
                shard[tensor] = dataclasses.replace(part, offset=totals.get(tensor, 0))
                totals[tensor] = totals.get(tensor, 0) + part.numel
            parts.append(shard)
        for tensor, total in totals.items():
            param = nn.Parameter(torch.empty(total, dtype=dtypes[tensor]), requires_grad=False)
            set_weight_attrs(param, {"weight_loader": self._weight_loader(layer, tensor)})
            layer.register_parameter(tensor, param)
        layer.lowrank_ops_parts = parts
        layer.lowrank_ops_loaded = set()
        layer.lowrank_ops_out_sizes = list(output_partition_sizes)

    @staticmethod
    def _float_dtype(tensor: str, entry: dict | None, params_dtype: torch.dtype) -> torch.dtype:
        if tensor in ("scales", "zeros") and entry.get("dtype") != str(params_dtype).removeprefix("torch."):
            return torch.float32  # exact for any saved float dtype: W_hat stays the saved one
        return params_dtype

    def _weight_loader(self, layer: nn.Module, tensor: str):
        names = [name for name, _ in self.shards]

        def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
            if shard_id is None and len(names) == 1:
                index = 0
            elif isinstance(shard_id, str) and shard_id in _QKV_SHARDS and len(names) == 3:
                index = _QKV_SHARDS.index(shard_id)
            elif isinstance(shard_id, int) and 0 <= shard_id < len(names):
                index = shard_id
            else:
                raise ValueError(f"lowrank_ops vLLM plugin: cannot place {tensor} with shard id {shard_id!r} in "
                                 f"the layer of {names} (checkpoints with pre-fused tensors are not "
                                 "supported)")  # fmt: skip
            name = names[index]
            part = layer.lowrank_ops_parts[index].get(tensor)
            if part is None:
                raise ValueError(f"lowrank_ops vLLM plugin: the checkpoint has {name}.{tensor}, which its manifest "
                                 f"entry {self.shards[index][1]} does not have")  # fmt: skip
            if tuple(loaded.shape) != part.full_shape:
                raise ValueError(f"lowrank_ops vLLM plugin: {name}.{tensor} has shape {tuple(loaded.shape)}, its "
                                 f"manifest entry says {part.full_shape}")  # fmt: skip
            if not param.dtype.is_floating_point and loaded.dtype != param.dtype:
                raise ValueError(f"lowrank_ops vLLM plugin: {name}.{tensor} is {loaded.dtype}, expected "
                                 f"{param.dtype}")  # fmt: skip
            target = param.data.narrow(0, part.offset, part.numel).view(part.shape)
            target.copy_(part.take(loaded))
            layer.lowrank_ops_loaded.add((index, tensor))

        return load

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        loaded = layer.lowrank_ops_loaded
        missing = [f"{name}.{tensor}" for index, (name, _) in enumerate(self.shards)
                   for tensor in layer.lowrank_ops_parts[index] if (index, tensor) not in loaded]  # fmt: skip
        if missing:
            raise ValueError(f"lowrank_ops vLLM plugin: the checkpoint lacks {missing}")
        runners = []
        for index, (name, entry) in enumerate(self.shards):
            views = {tensor: getattr(layer, tensor).data.narrow(0, part.offset, part.numel).view(part.shape)
                     for tensor, part in layer.lowrank_ops_parts[index].items()}  # fmt: skip
            weight = layer.lowrank_ops_parts[index].get("weight")
            aligned = weight is not None and (weight.dim is None or weight.start % 4 == 0)
            runners.append(_shard_runner(name, entry, views, check_pattern=aligned))
        layer.lowrank_ops_runners = runners

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        runners = layer.lowrank_ops_runners
        if len(runners) == 1:
            return runners[0](x, bias)
        outputs, start = [], 0
        for run, size in zip(runners, layer.lowrank_ops_out_sizes):
            outputs.append(run(x, None if bias is None else bias[start:start + size]))
            start += size
        return torch.cat(outputs, dim=-1)


# ---------------------------------------------------------------------------------------------------------------
# Forward of one shard through the package's ops


def _residual_fits(v: torch.Tensor | None, u: torch.Tensor | None) -> bool:
    """The ops take a residual of rank r <= min(m, n); a rank-r factor pair split across ranks can hold fewer local
    rows or columns than r (r = 200 with 128 columns per rank): then the residual runs as two GEMMs beside the op."""
    return v is not None and v.shape[0] <= min(u.shape[0], v.shape[1])


# vLLM's own CPU GEMMs run only bf16 / fp16 shards: measured on the 2-core AMD EPYC (1 thread, vLLM 0.32), its
# prepacked oneDNN GEMM against F.linear, M = 1: bf16 1536 x 576 37 vs 119 us, 192 x 576 11 vs 23 us, a 1536 x 576
# rank-64 U (V x) 19 vs 43 us; but in fp32 the thin factors lose (rank 64: 22 vs 15 us), so fp32 keeps F.linear.
_VLLM_GEMM_DTYPES = (torch.bfloat16, torch.float16)


def cpu_gemm(weight: torch.Tensor):
    """(x, bias) -> x W^T + b for a (out, in) weight, run by the GEMM vLLM gives its own dense layers on the CPU
    (`dispatch_cpu_unquantized_gemm`: a oneDNN primitive on a copy of W prepacked once, or sgl-kernel's on AMX CPUs):
    vLLM's dense bf16 layers never run F.linear, and a factored layer compared with them must not either. F.linear
    where that does not apply (GPU, fp32, an empty weight). The prepacked copy costs W's bytes again."""
    if weight.device.type != "cpu" or weight.dtype not in _VLLM_GEMM_DTYPES or weight.numel() == 0:
        return lambda x, bias=None: F.linear(x, weight, bias)
    holder = nn.Module()
    holder.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    dispatch_cpu_unquantized_gemm(holder, remove_weight=False)
    return lambda x, bias=None: holder.cpu_linear(x, holder.weight, bias)


def _shard_runner(name: str, entry: dict | None, t: dict[str, torch.Tensor], check_pattern: bool = True):
    """A function (x, bias) -> y computing one shard on this rank's tensors `t`, checked here, once: the codebook
    index range, and the 2:4 pattern where `check_pattern` (this rank's columns start on a run of 4).

    On the CPU in bf16 / fp16, every dense-form GEMM (a dense shard, the 2:4 base stored dense, the factors, the
    codebook) runs vLLM's own CPU GEMM (`cpu_gemm`), in the order of the ops' torch paths; the int base runs
    quant_lowrank_matmul (aten's int4 kernel, residual fused). Elsewhere every shard runs the package's ops."""
    kind = None if entry is None else entry["module"]
    v, u = t.get("v"), t.get("u")
    fused = _residual_fits(v, u)
    dense_form = [t[k] for k in ("weight", "codebook", "v") if k in t]  # the float tensors a GEMM would take
    vllm_gemm = bool(dense_form) and dense_form[0].device.type == "cpu" and dense_form[0].dtype in _VLLM_GEMM_DTYPES
    # the residual runs beside the op where it does not fit the op, or on vLLM's GEMM (not the int4 kernel's fused one)
    if v is not None and (not fused or (vllm_gemm and kind != "QuantLowRankLinear")):
        shrink, expand = cpu_gemm(v), cpu_gemm(u)

        def residual(y, x):
            return y + expand(shrink(x))
    else:
        def residual(y, x):
            return y

    if kind is None:
        return cpu_gemm(t["weight"])
    if kind == "LowRankLinear":
        if vllm_gemm or not fused:
            return lambda x, bias: expand(shrink(x), bias)
        return lambda x, bias: lowrank_matmul(x, v, u, bias)
    if kind == "SparseLowRankLinear":
        weight = t["weight"]
        if check_pattern and (bad := two_of_four_violation(weight)) is not None:
            raise ValueError(f"lowrank_ops vLLM plugin: {name}.weight is not 2:4 sparse (row {bad[0]}, columns "
                             f"{bad[1]}..{bad[1] + 3} hold {bad[2]} non-zeros); the file is corrupt")  # fmt: skip
        base = cpu_gemm(weight)
        if v is not None and fused and not vllm_gemm:
            return lambda x, bias: base(x, bias) + lowrank_matmul(x, v, u)
        return lambda x, bias: residual(base(x, bias), x)
    if kind == "QuantLowRankLinear":
        qweight, scales, zeros = t["qweight"], t["scales"], t["zeros"]
        bits, group = entry["bits"], entry["group_size"]
        fv, fu = (v, u) if fused else (None, None)
        return lambda x, bias: residual(quant_lowrank_matmul(x, qweight, scales, zeros, fv, fu, bias, bits, group), x)
    # SharedChannelLinear
    codebook, index, shared = t["codebook"], t["index"], entry["shared"]
    clusters = entry["clusters"]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= clusters):
        raise ValueError(f"lowrank_ops vLLM plugin: {name}.index spans [{int(index.min())}, {int(index.max())}], "
                         f"outside [0, {clusters}) (clusters); the file is corrupt")  # fmt: skip
    if vllm_gemm:
        by_codebook = cpu_gemm(codebook)
        if shared == "rows":  # y = (x C^T)[:, idx]
            return lambda x, bias: _add_bias(residual(by_codebook(x).index_select(-1, index), x), bias)
        entries = codebook.shape[1]  # y = s(x) C^T, s(x)_j = sum of x_f over idx[f] = j
        return lambda x, bias: _add_bias(residual(by_codebook(_segment_sum(x, index, entries)), x), bias)
    fv, fu = (v, u) if fused else (None, None)
    return lambda x, bias: residual(codebook_matmul(x, codebook, index, fv, fu, bias, shared=shared), x)


def _segment_sum(x: torch.Tensor, index: torch.Tensor, entries: int) -> torch.Tensor:
    """codebook_matmul's segment sum (fp32 accumulation, one rounding to x's dtype) over x's last dimension."""
    return segment_sum(x.reshape(-1, x.shape[-1]), index, entries).to(x.dtype).reshape(*x.shape[:-1], entries)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y.add_(bias)


def register() -> None:
    """The `vllm.general_plugins` entry point: importing this module registered the quantization method."""
    return None

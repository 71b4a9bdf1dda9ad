"""Every compression method's output on tiny models, recorded so that a refactoring of the pipeline can prove it
changed nothing (tests/test_method_outputs.py; `python tests/method_outputs.py --record` rewrites the record).

Each case compresses a tiny GQA Llama (random weights, fixed seed) with one config on fixed random token windows and
summarises the result two ways:
- `state_sha256`: a hash of the whole state dict (names, dtypes, shapes, bytes). Bit-identical output gives the same
  hash. It can only be compared on a machine whose float kernels give the bits of the recording machine: LAPACK /
  BLAS pick different code paths on different CPUs; `numerics_sha256` hashes a few SVD / Cholesky / eigh / matmul
  results to tell.
- `probes`: for every targeted layer, its effective dense weight W' (the module's `to_linear()`) seen through fixed
  random projections, B^T W' A (4 x 4, float64), and the same of the last-position logits of a fixed batch. Any
  change of W' moves them (almost surely); the sign of singular vectors and the storage layout do not. Compared with
  a relative tolerance on any machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch

RECORD = Path(__file__).with_name("data") / "method_outputs.json"


def _tokens(n_windows=6, seq_len=32, vocab=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n_windows, seq_len), generator=generator)


COMMON = dict(calib_tokens=6 * 32, seq_len=32, batch_size=3, device="cpu")

# name -> (config kind, fields). Kinds map to the config classes in `_config`.
CASES: dict[str, tuple[str, dict]] = {
    **{f"{method}-{allocator}": ("lowrank", dict(method=method, allocator=allocator, param_ratio=0.6, align=4))
       for method in ("svd", "asvd", "whiten") for allocator in ("uniform", "loss", "fisher")},
    "whiten-sensitivity": ("lowrank", dict(method="whiten", allocator="sensitivity", param_ratio=0.6, align=4,
                                           sensitivity_ratios=[0.3, 0.6, 0.9], sensitivity_tokens=64)),
    "asvd-uniform-sequential": ("lowrank", dict(method="asvd", param_ratio=0.6, align=4, sequential=True)),
    "whiten-uniform-sequential": ("lowrank", dict(method="whiten", param_ratio=0.6, align=4, sequential=True)),
    "eora-int4-g16": ("eora", dict(base="int4-g16", rank=8, residual="eora")),
    "eora-int3-g16": ("eora", dict(base="int3-g16", rank=8, residual="eora")),
    "svd-int4-g16": ("eora", dict(base="int4-g16", rank=8, residual="svd")),
    "lqer-int3-g16": ("eora", dict(base="int3-g16", rank=8, residual="lqer")),
    "eora-gptq-int4-g16": ("eora", dict(base="gptq-int4-g16", rank=8, residual="eora")),
    "eora-gptq-int4-g16-sequential": ("eora", dict(base="gptq-int4-g16", rank=8, residual="eora", sequential=True)),
    "eora-2:4-wanda": ("eora", dict(base="2:4-wanda", rank=8, residual="eora")),
    "svd-2:4-magnitude": ("eora", dict(base="2:4-magnitude", rank=4, residual="svd")),
    "int4-g16-base-only": ("eora", dict(base="int4-g16", rank=0)),
    "swsc-rows": ("swsc", dict(shared="rows", clusters=8, bits=None, rank=4, residual="svd", n_iter=10)),
    "swsc-columns-eora": ("swsc", dict(shared="columns", clusters=8, bits=None, rank=4, residual="eora", n_iter=10)),
    "swsc-rows-bits-unweighted": ("swsc", dict(shared="rows", bits=6.0, rank=4, weighted=False, n_iter=10)),
    "basis-whiten-fisher": ("basis", dict(param_ratio=0.6, align=4, score_tokens=64)),
    "basis-svd-energy": ("basis", dict(param_ratio=0.6, align=4, basis="svd", score="energy")),
    "basis-asvd-taylor-new": ("basis", dict(param_ratio=0.6, align=4, basis="asvd", score="taylor", new_rank=4,
                                            score_tokens=64)),
    "basis-whiten-fisher-trained": ("basis", dict(param_ratio=0.6, align=4, score_tokens=64, new_rank=4,
                                                  train_steps=4, eval_every=2)),
}  # fmt: skip


def _config(kind: str, fields: dict):
    from lowrank_ops import configs

    classes = {"lowrank": "LowRankConfig", "eora": "BaseResidualConfig", "swsc": "SwscConfig", "basis": "BasisConfig"}
    return getattr(configs, classes[kind])(**{**COMMON, **fields})


def _model():
    from lowrank_ops.assets import tiny_llama

    return tiny_llama(vocab_size=128, hidden_size=48, intermediate_size=80, max_position_embeddings=64)


def compress_case(name: str, cache_dir: Path):
    """The tiny model compressed as CASES[name] says."""
    from lowrank_ops.compress import compress_

    kind, fields = CASES[name]
    model = _model()
    extra = {}
    if kind == "basis" and fields.get("train_steps", 0) > 0:
        extra = dict(train=_tokens(4, seed=1), heldout=_tokens(2, seed=2))
    compress_(model, _config(kind, fields), _tokens(), progress=False, cache_dir=cache_dir, **extra)
    return model


def state_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def probes(model: torch.nn.Module) -> dict[str, list[float]]:
    """Effective weights and last-position logits of a fixed batch, seen through fixed random projections."""
    from lowrank_ops.surgery import linear_weight

    generator = torch.Generator().manual_seed(1234)

    def project(matrix: torch.Tensor) -> list[float]:  # B^T M A with B (rows, 4), A (columns, 4): 16 numbers
        a = torch.randn(matrix.shape[1], 4, generator=generator, dtype=torch.float64)
        b = torch.randn(matrix.shape[0], 4, generator=generator, dtype=torch.float64)
        return [float(f"{value:.12g}") for value in (b.T @ matrix.detach().double() @ a).flatten().tolist()]

    out = {}
    for layer, module in model.named_modules():
        if layer.endswith("_proj"):
            out[layer] = project(module.to_linear().weight if hasattr(module, "to_linear") else linear_weight(module))
    with torch.no_grad():
        out["logits"] = project(model(_tokens(2, 16, seed=3)).logits[:, -1])
    return out


def numerics_sha256() -> str:
    """Bits of the float kernels the methods rely on (matmul, SVD, Cholesky, eigh, QR) on fixed inputs."""
    generator = torch.Generator().manual_seed(7)
    a = torch.randn(48, 80, generator=generator)
    gram = a.double().T @ a.double() + torch.eye(80, dtype=torch.float64)
    results = [a @ a.T, *torch.linalg.svd(a, full_matrices=False), torch.linalg.cholesky(gram),
               *torch.linalg.eigh(gram), *torch.linalg.qr(a.T)]  # fmt: skip
    digest = hashlib.sha256()
    for tensor in results:
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def record(cache_dir: Path) -> dict:
    out = {"torch": torch.__version__, "numerics_sha256": numerics_sha256(), "cases": {}}
    for name in CASES:
        model = compress_case(name, cache_dir)
        out["cases"][name] = {"state_sha256": state_sha256(model), "probes": probes(model)}
        print(name, out["cases"][name]["state_sha256"][:16])
    return out


if __name__ == "__main__":
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", action="store_true", help=f"rewrite {RECORD}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = record(Path(tmp))
    if args.record:
        RECORD.parent.mkdir(exist_ok=True)
        RECORD.write_text(json.dumps(result, indent=1).replace("\n   ", " ") + "\n")
        print(f"wrote {RECORD}")

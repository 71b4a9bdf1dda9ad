"""`lowrank-ops plot`: one PNG of compression runs, read from their result files.

A run is a directory written by `compress --out` (its results.json) or a JSON file written by `eval --out`; both
hold perplexities under "dense" / "compressed" and the model's tensor bytes under "bytes". Left panel: perplexity
against saved size (MB) over every run (each result's dense and compressed points). Right panel: the per-layer
ranks of the first run with a layer table (a layer kept dense is drawn at its full rank, grey). Needs matplotlib
(`pip install lowrank-ops[plot]`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS_FILE = "results.json"  # = lowrank_ops.pipeline.RESULTS_FILE (a level above; tests check they agree)


def read_run(path: str | os.PathLike) -> dict:
    """The result dict of a run: `path`/results.json for a directory, else the JSON file `path`."""
    path = Path(path)
    file = path / RESULTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"plot: {path} is neither a compress --out directory (no {RESULTS_FILE}) nor a "
                                "result file of eval --out")  # fmt: skip
    try:
        result = json.loads(file.read_text())
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"plot: {file} is not valid JSON ({exc})") from None
    if not isinstance(result, dict) or not ({"dense", "compressed", "compression"} & result.keys()):
        raise ValueError(f"plot: {file} is not a lowrank-ops result (no dense / compressed perplexity, no layer table)")
    return result


def size_points(name: str, run: dict) -> list[tuple[str, float, float, str]]:
    """(label, MB, perplexity, protocol) of each evaluated model of the run `name` that records its size; the
    protocol says on how many tokens, in windows of what length (perplexities compare only at equal protocols)."""
    points = []
    for key in ("dense", "compressed"):
        size = run.get("bytes", {}).get(key)
        if key in run and size is not None:
            label = "dense" if key == "dense" else f"{Path(name).name}: {run.get('variant', 'compressed')}"
            protocol = f"{run[key]['tokens']} tokens, windows of {run[key]['seq_len']}"
            points.append((label, size / 1e6, run[key]["perplexity"], protocol))
    return points


def plot_runs(paths: list[str | os.PathLike], png: str | os.PathLike) -> Path:
    """Draw the runs at `paths` into the PNG `png` (written through a temporary file and one rename); returns it."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plot: needs matplotlib: pip install 'lowrank-ops[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(str(path), read_run(path)) for path in paths]
    points = list(dict.fromkeys(point for name, run in runs for point in size_points(name, run)))
    ranked = next(((name, run) for name, run in runs if run.get("compression", {}).get("layers")), None)
    if not points and ranked is None:
        raise ValueError("plot: no run has an evaluated perplexity with a size, nor a layer table")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (label, megabytes, ppl, _) in enumerate(points):
        left.plot(megabytes, ppl, "s" if label == "dense" else "o", color="black" if label == "dense" else f"C{i}")
        left.annotate(label, (megabytes, ppl), fontsize=7, textcoords="offset points", xytext=(4, 4))
    protocols = sorted({point[3] for point in points})
    title = "perplexity against size\n(Wikipedia test, " + (
        f"{protocols[0]})" if len(protocols) == 1 else f"NOT comparable: {'; '.join(protocols)})")
    left.set(title=title,
             xlabel="saved size (MB, all tensors)", ylabel="perplexity")  # fmt: skip
    left.grid(alpha=0.3)
    if ranked is None:
        right.set_axis_off()
        right.text(0.5, 0.5, "no run with a layer table", ha="center", va="center")
    else:
        name, run = ranked
        layers = run["compression"]["layers"]
        full = [min(layer["out_features"], layer["in_features"]) for layer in layers]
        ranks = [f if layer["rank"] is None else layer["rank"] for layer, f in zip(layers, full)]
        colors = ["lightgray" if layer["rank"] is None else "C0" for layer in layers]
        right.bar(range(len(layers)), full, color="none", edgecolor="lightgray", linewidth=0.5, label="full rank")
        right.bar(range(len(layers)), ranks, color=colors, label="rank (grey: kept dense)")
        right.set(title=f"per-layer ranks: {Path(name).name}: {run.get('variant', '')}", xlabel="targeted layer",
                  ylabel="rank")  # fmt: skip
        right.legend(fontsize=8)
    fig.suptitle(", ".join(name for name, _ in runs), fontsize=8)
    fig.tight_layout()
    png = Path(png)
    partial = png.with_name(f".{png.stem}.{os.getpid()}.png")
    try:
        fig.savefig(partial, dpi=110)
        os.replace(partial, png)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)
    return png

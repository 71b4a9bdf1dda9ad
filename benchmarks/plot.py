"""The shared plotting script of lowrank-ops benchmarks: one PNG from one results JSON.

    python benchmarks/plot.py benchmarks/results/lowrank_matmul-h100.json [--out PNG]

Any bench that writes `lowrank_ops.benchmarking.write_results` files can use it. One panel per (shape, M):
x = rank (or whatever `header["plot"]["x"]` names, e.g. "param_ratio"), y = median microseconds with a p20-p80
band, one line per provider. Rows without an x value (a dense baseline) are drawn as a horizontal dashed
line across their panel; the smallest `byte_floor_us` at each x is drawn dotted. The title names the device
from the header; CPU results say so in the title.

Hints a bench may put in `header["plot"]`: x (row key for the x axis, default "rank"), panel_cols (row key,
default "M"), line (row key, default "provider"), shape_keys (row keys forming the shape, default ["m", "n"]),
y (row key for the y axis, default "median_us"), log_y (bool, default False).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402


def _shape_label(row: dict, shape_keys: list[str]) -> str:
    if all(row.get(k) is not None for k in shape_keys):
        return "x".join(str(row[k]) for k in shape_keys)
    return str(row.get("shape", "?"))


def plot_results(json_path: str | os.PathLike, png_path: str | os.PathLike | None = None) -> Path:
    """Draw the results file `json_path` into `png_path` (default: same name, .png), written atomically."""
    json_path = Path(json_path)
    png_path = Path(png_path) if png_path is not None else json_path.with_suffix(".png")
    data = json.loads(json_path.read_text())
    header, rows = data.get("header", {}), data.get("rows", [])
    hints = header.get("plot", {})
    x_key = hints.get("x", "rank")
    col_key = hints.get("panel_cols", "M")
    line_key = hints.get("line", "provider")
    shape_keys = hints.get("shape_keys", ["m", "n"])
    y_key = hints.get("y", "median_us")
    log_y = bool(hints.get("log_y", False))

    rows = [r for r in rows if r.get(y_key) is not None]
    panel_rows: list[str] = []
    panel_cols: list = []
    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        shape = _shape_label(r, shape_keys)
        col = r.get(col_key)
        if shape not in panel_rows:
            panel_rows.append(shape)
        if col not in panel_cols:
            panel_cols.append(col)
        panels[(shape, col)].append(r)
    panel_cols.sort(key=lambda c: (c is None, c if isinstance(c, (int, float)) else str(c)))
    n_rows, n_cols = max(1, len(panel_rows)), max(1, len(panel_cols))

    # at least 8 x 4 inches, so one-panel plots keep their title and legend readable
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(max(3.6 * n_cols, 8.0), max(2.9 * n_rows, 4.0)), squeeze=False)
    providers = sorted({str(r.get(line_key)) for r in rows})
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    for i, shape in enumerate(panel_rows):
        for j, col in enumerate(panel_cols):
            ax = axes[i][j]
            group = panels.get((shape, col), [])
            if not group:
                ax.set_visible(False)
                continue
            by_line: dict[str, list[dict]] = defaultdict(list)
            for r in group:
                by_line[str(r.get(line_key))].append(r)
            xs_all = sorted({r[x_key] for r in group if r.get(x_key) is not None})
            for name, line in sorted(by_line.items()):
                pts = sorted((r for r in line if r.get(x_key) is not None), key=lambda r: r[x_key])
                flat = [r for r in line if r.get(x_key) is None]
                if pts:
                    xs = [r[x_key] for r in pts]
                    ax.plot(xs, [r[y_key] for r in pts], "o-", ms=3, lw=1.2, color=colors[name], label=name)
                    if y_key == "median_us" and all(
                        r.get("p20_us") is not None and r.get("p80_us") is not None for r in pts
                    ):
                        ax.fill_between(
                            xs, [r["p20_us"] for r in pts], [r["p80_us"] for r in pts], color=colors[name], alpha=0.2
                        )
                for r in flat:
                    ax.axhline(r[y_key], ls="--", lw=1.2, color=colors[name], label=name)
            floors = {}
            for r in group:
                if r.get(x_key) is not None and r.get("byte_floor_us") is not None:
                    floors[r[x_key]] = min(floors.get(r[x_key], float("inf")), r["byte_floor_us"])
            if floors:
                fx = sorted(floors)
                ax.plot(fx, [floors[x] for x in fx], ":", color="gray", lw=1.2, label="byte floor")
            if len(xs_all) > 1 and all(isinstance(x, (int, float)) and x > 0 for x in xs_all):
                if xs_all[-1] / xs_all[0] > 4:
                    ax.set_xscale("log", base=2)
                    ax.xaxis.set_major_formatter(ScalarFormatter())
                    ax.xaxis.set_minor_formatter(NullFormatter())
            if log_y:
                ax.set_yscale("log")
            else:
                ax.set_ylim(bottom=0)
            ax.set_title(f"{shape}, {col_key}={col}", fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            if i == n_rows - 1:
                ax.set_xlabel(x_key, fontsize=8)
            if j == 0:
                ax.set_ylabel("median us" if y_key == "median_us" else y_key, fontsize=8)
    handles, labels = {}, []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="upper right", fontsize=8)

    device = header.get("device", "unknown device")
    what = header.get("bench") or json_path.stem
    sha = header.get("git_sha") or "unknown"
    if header.get("git_dirty"):
        sha += "+dirty"
    title = f"{what} on {device}  |  {header.get('dtype', '')}  torch {header.get('torch')}  git {sha}"
    if header.get("is_gpu") is False:
        title += "\nCPU ONLY: these are not GPU numbers"
    fig.suptitle(title, fontsize=11)
    legend_room = 0.92 if n_cols > 2 else 0.72  # few panels: the legend needs its own column
    fig.tight_layout(rect=(0, 0, legend_room, 0.97 if header.get("is_gpu") else 0.95))

    png_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=png_path.parent, prefix=f".{png_path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, png_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results JSON written by a benchmarks/bench_*.py")
    parser.add_argument("--out", default=None, help="PNG path (default: the JSON path with .png)")
    args = parser.parse_args(argv)
    print(plot_results(args.results, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

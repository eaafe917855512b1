"""Plots the training benchmarks of docs/performance.md: each one's time as a
multiple of Flax's, as the range measured over runs: docs/figures/performance.svg.

    python docs/figures/performance.py [--out docs/figures]

The ranges are in performance.csv beside this script, copied from the table of
docs/performance.md, which joins the runs of `python benchmarks/run.py` and the
interleaved A/B runs recorded in benchmarks/RESULTS.md. The ResNet and MLP rows
compare whole models; their "channels first/last" is the input's layout (the
ResNet computes channels last inside either way); the MLP has one layout.
"""

import argparse
import csv
import pathlib

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "eqx_bn"  # the same file from the same data
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

HERE = pathlib.Path(__file__).resolve().parent
COLOURS = {
    "eqx_bn channels last": "#264653",
    "eqx_bn channels first": "#2a9d8f",
    "eqx.nn.BatchNorm": "#e76f51",
}


def read(path: pathlib.Path) -> dict[str, dict[str, tuple[float, float]]]:
    rows: dict[str, dict[str, tuple[float, float]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["benchmark"], {})[row["variant"]] = (
                float(row["low"]),
                float(row["high"]),
            )
    return rows


def plot(rows, path: pathlib.Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 5.2), layout="constrained")
    height = 0.25
    labels = list(rows)
    for i, benchmark in enumerate(labels):
        for j, (variant, colour) in enumerate(COLOURS.items()):
            if variant not in rows[benchmark]:
                continue
            low, high = rows[benchmark][variant]
            y = i + (j - 1) * height
            ax.barh(
                y,
                max(high - low, low * 0.02),  # a visible bar when low == high
                left=low,
                height=height * 0.85,
                color=colour,
                label=variant if i == 0 else None,
                log=True,
            )
            ax.text(
                max(high, low * 1.02) * 1.04,
                y,
                f"{low:g}-{high:g}x" if low != high else f"{low:g}x",
                va="center",
                fontsize=7,
            )
    ax.axvline(1.0, color="black", lw=1)
    ax.text(1.0, len(labels) - 0.6, " Flax = 1", fontsize=8, va="bottom")
    ax.set_xscale("log")
    ax.set_xlim(0.1, 12)
    ax.set_xticks(
        [0.1, 0.2, 0.5, 1, 2, 5, 10], ["0.1x", "0.2x", "0.5x", "1x", "2x", "5x", "10x"]
    )
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -1)
    ax.set_xlabel("time / flax.linen's time (lower is faster), range over runs")
    ax.set_title("Training: forward + backward on the 2-core CPU (XLA:CPU)")
    ax.legend(loc="lower right", frameon=False, fontsize=8)
    ax.grid(axis="x", which="major", lw=0.3)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(read(HERE / "performance.csv"), args.out / "performance.svg")


if __name__ == "__main__":
    main()

"""Draws why eqx_bn sums values and counts across devices instead of averaging
per-device means: docs/figures/global_statistics.svg.

    python docs/figures/global_statistics.py [--out docs/figures]

Two devices hold one channel of a masked batch: 6 valid values on the first, 2 on
the second (the rest is padding). The means drawn are not computed here by hand:
they are the running means that `flax.linen.BatchNorm` and `eqx_bn.BatchNorm`
(momentum 0, so the running mean is the batch mean) produce for this batch, with
the device axis made by `jax.vmap(..., axis_name="device")`.
"""

import argparse
import pathlib

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

import eqx_bn

matplotlib.use("Agg")
matplotlib.rcParams["svg.hashsalt"] = "eqx_bn"  # the same file from the same data
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

HERE = pathlib.Path(__file__).resolve().parent
VALUES = np.array(
    [
        [0.2, 0.5, 0.9, 1.1, 1.4, 1.9, 0.0, 0.0],  # device 0: 6 valid
        [3.6, 4.4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # device 1: 2 valid
    ],
    np.float32,
)
MASK = np.array([[1] * 6 + [0] * 2, [1] * 2 + [0] * 6], bool)


def flax_mean() -> float:
    bn = nn.BatchNorm(use_running_average=False, momentum=0.0, axis_name="device")
    x, mask = jnp.asarray(VALUES)[..., None], jnp.asarray(MASK)[..., None]

    def one_device(x, mask):
        variables = bn.init(jax.random.key(0), x, mask=mask)
        _, updates = bn.apply(variables, x, mask=mask, mutable=["batch_stats"])
        return updates["batch_stats"]["mean"]

    return float(jax.vmap(one_device, axis_name="device")(x, mask)[0, 0])


def eqx_bn_mean() -> float:
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        1, axis_name="device", momentum=0.0, channels_last=True
    )
    x, mask = jnp.asarray(VALUES)[..., None], jnp.asarray(MASK)[..., None]

    def one_device(x, mask):
        # `x` is one device's `(8, 1)` rows, an "example" with a spatial axis of 8:
        # the statistics reduce over its rows, then over the devices.
        _, new_state = bn(x, state, mask=mask)
        return new_state.get(bn.state_index).mean

    return float(jax.vmap(one_device, axis_name="device")(x, mask)[0, 0])


def plot(flax: float, ours: float, path: pathlib.Path) -> None:
    device_means = [VALUES[d][MASK[d]].mean() for d in range(2)]
    colours = ["#2a9d8f", "#8ab17d"]
    fig, ax = plt.subplots(figsize=(9, 3.4), layout="constrained")
    for d in range(2):
        valid = VALUES[d][MASK[d]]
        ax.scatter(valid, np.full(valid.shape, 1 - d), s=60, color=colours[d], zorder=3)
        ax.vlines(device_means[d], 0.78 - d, 1.22 - d, color=colours[d], lw=2)
        ax.text(
            device_means[d],
            1.28 - d,
            f"mean {device_means[d]:.2f}",
            ha="center",
            fontsize=8,
            color=colours[d],
        )
        n_pad = int((~MASK[d]).sum())
        ax.text(
            4.9,
            1 - d,
            f"device {d}: {MASK[d].sum()} valid, {n_pad} padding",
            va="center",
            fontsize=9,
        )
    ax.axvline(flax, ymin=0.02, ymax=0.98, color="#e76f51", lw=2, ls="--")
    ax.axvline(ours, ymin=0.02, ymax=0.98, color="#264653", lw=2)
    ax.text(
        flax + 0.08,
        -0.62,
        f"flax.linen: mean of the\ndevice means = {flax:.3f}",
        ha="left",
        fontsize=9,
        color="#e76f51",
    )
    ax.text(
        ours - 0.08,
        -0.62,
        f"eqx_bn: psum(sum) / psum(count)\n= {ours:.3f}, the batch's mean",
        ha="right",
        fontsize=9,
        color="#264653",
    )
    ax.set_ylim(-0.75, 1.5)
    ax.set_xlim(-0.2, 7.4)
    ax.set_yticks([])
    ax.set_xlabel("value (one channel)")
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=HERE)
    args = parser.parse_args(argv)
    flax, ours = flax_mean(), eqx_bn_mean()
    valid = VALUES[MASK]
    # The figure's claim, checked: eqx_bn's is the mean of every valid value.
    np.testing.assert_allclose(ours, valid.mean(), rtol=1e-6)
    print(
        f"flax.linen {flax:.4f}, eqx_bn {ours:.4f}, all valid values {valid.mean():.4f}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plot(flax, ours, args.out / "global_statistics.svg")


if __name__ == "__main__":
    main()

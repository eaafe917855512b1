"""Average a digits CNN's weights, recalibrate its BatchNorm statistics, and fine-tune
it with frozen BatchNorms.

    python examples/after_training.py            # full run
    python examples/after_training.py --smoke    # a few steps, for the tests
    python examples/after_training.py --out DIR  # where to write (default ./outputs)

What PyTorch users do after training, on the CNN of `digits_cnn.py` (scikit-learn's
digits, offline):

1. Train with SGD, the learning rate held constant for the last epochs, keeping two
   averages of the weights beside the `TrainState`: SWA's equal-weight mean over the
   last epochs (`eqx_bn.train.swa()`, PyTorch's `AveragedModel(model)`) and an
   exponential moving average with the running statistics averaged too
   (`eqx_bn.train.ema(decay)`, `AveragedModel(..., use_buffers=True)`).
2. Evaluate the SWA average with stale statistics: its running statistics are the
   last model's, measured on activations the averaged weights do not produce.
3. Recompute them with one pass over training batches (`eqx_bn.recalibrate`,
   PyTorch's `torch.optim.swa_utils.update_bn`).
4. Fine-tune the result on a few examples with batches of 2, once with live
   BatchNorms (each step's statistics come from two images, and the running
   averages drift towards them) and once with every BatchNorm frozen
   (`eqx_bn.freeze_batch_norms`, torchvision's `FrozenBatchNorm2d`).

The held-out accuracy of each model is printed and drawn as a bar chart
(`after_training.png` under `--out`); the numbers also go to `after_training.json`.
"""

import json
import pathlib
import sys

import equinox as eqx
import jax
import matplotlib
import numpy as np
import optax
from _common import Progress, batches, digits, parser, runtime, save_figure
from digits_cnn import CNN, loss_fn

import eqx_bn
from eqx_bn.train import TrainState, ema, make_eval_step, make_train_step, swa

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

BATCH = 64
FINE_TUNE_BATCH = 2


def accuracy(eval_step, ts, x, y) -> float:
    _, (_, correct) = eval_step(ts, (x, y))
    return float(correct) / len(x)


def train(args, x_train, y_train, x_test, y_test) -> dict:
    """SGD with momentum: a cosine decay to a constant learning rate, held for the
    last `swa_epochs` epochs, over which SWA averages; the EMA runs throughout."""
    epochs = args.epochs or (2 if args.smoke else 12)
    swa_epochs = 1 if args.smoke else 4
    per_epoch = len(x_train) // BATCH
    model, state = eqx.nn.make_with_state(CNN)(jax.random.key(args.seed))
    schedule = optax.join_schedules(
        [
            optax.cosine_decay_schedule(0.1, (epochs - swa_epochs) * per_epoch),
            optax.constant_schedule(args.swa_lr),
        ],
        [(epochs - swa_epochs) * per_epoch],
    )
    ts = TrainState.create(model, state, optax.sgd(schedule, momentum=0.9))
    train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)
    averagers = {"swa": swa(), "ema": ema(args.ema_decay)}
    averages = {name: a.init(ts) for name, a in averagers.items()}
    rng = np.random.default_rng(args.seed)
    with Progress(epochs * per_epoch, "training") as progress:
        for epoch in range(epochs):
            averaging_swa = epoch >= epochs - swa_epochs
            for batch in batches(x_train, y_train, BATCH, rng):
                ts, loss, _ = train_step(ts, batch)
                averages["ema"] = averagers["ema"].update(averages["ema"], ts)
                if averaging_swa:
                    averages["swa"] = averagers["swa"].update(averages["swa"], ts)
                progress.step()
            progress.epoch(
                epoch + 1,
                epochs,
                train_loss=float(loss),
                test_acc=accuracy(eval_step, ts, x_test, y_test),
            )
    return dict(ts=ts, averages=averages, eval_step=eval_step)


def fine_tune(args, ts, x, y, *, frozen: bool):
    """One pass over `x` in batches of `FINE_TUNE_BATCH` at a small learning rate."""
    model = eqx_bn.freeze_batch_norms(ts.model) if frozen else ts.model
    tuned = TrainState.create(model, ts.state, optax.sgd(1e-3, momentum=0.9))
    train_step = make_train_step(loss_fn)
    rng = np.random.default_rng(args.seed + 1)
    for batch in batches(x, y, FINE_TUNE_BATCH, rng):
        tuned, _, _ = train_step(tuned, batch)
    return tuned


def plot(results: dict, path: pathlib.Path) -> None:
    names, values = list(results), [100 * v for v in results.values()]
    fig, ax = plt.subplots(figsize=(9, 4))
    bars = ax.barh(names[::-1], values[::-1], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f%%", padding=3)
    low = max(0.0, min(values) - 10)
    ax.set(xlim=(low, 100.5), xlabel="held-out accuracy (%)", title="After training")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    with runtime("after_training") as timing:
        out = run(args)
    return out | {"wall_s": timing["seconds"]}


def run(args) -> dict:
    x_train, y_train, x_test, y_test = digits(
        512 if args.smoke else None, channels="first"
    )
    print(f"digits: {len(x_train)} training and {len(x_test)} held-out images")
    trained = train(args, x_train, y_train, x_test, y_test)
    ts, eval_step = trained["ts"], trained["eval_step"]
    swa_avg, ema_avg = trained["averages"]["swa"], trained["averages"]["ema"]

    def acc(model, state) -> float:
        return accuracy(eval_step, ts.replace(model=model, state=state), x_test, y_test)

    # update_bn's loader: training batches, here 8 of them (512 images).
    loader = [x for x, _ in batches(x_train, y_train, BATCH, np.random.default_rng(0))]
    loader = loader[: 2 if args.smoke else 8]
    recalibrated = eqx_bn.recalibrate(swa_avg.model, swa_avg.state, loader)
    ema_recalibrated = eqx_bn.recalibrate(ema_avg.model, ema_avg.state, loader)
    results = {
        "last model": acc(ts.model, ts.state),
        "SWA, stale statistics": acc(swa_avg.model, swa_avg.state),
        "SWA, recalibrated": acc(swa_avg.model, recalibrated),
        "EMA, averaged statistics": acc(ema_avg.model, ema_avg.state),
        "EMA, recalibrated": acc(ema_avg.model, ema_recalibrated),
    }
    # Fine-tuning: a few examples, batches of 2, from the recalibrated SWA model.
    start = ts.replace(model=swa_avg.model, state=recalibrated)
    few = 64 if args.smoke else 256
    for frozen in (False, True):
        tuned = fine_tune(args, start, x_train[:few], y_train[:few], frozen=frozen)
        label = (
            "fine-tuned, frozen BatchNorm" if frozen else "fine-tuned, live BatchNorm"
        )
        results[label] = accuracy(eval_step, tuned, x_test, y_test)

    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  held-out accuracy {value:.4f}")
    out_dir = pathlib.Path(args.out)
    plot_path = out_dir / "after_training.png"
    plot(results, plot_path)
    (out_dir / "after_training.json").write_text(json.dumps(results, indent=1))
    print(f"plot: {plot_path}")
    return dict(results=results, plot=str(plot_path), steps=int(ts.step))


def _parser():
    result = parser(
        __doc__,
        out_help="the accuracy plot and numbers (after_training.png, .json)",
    )
    result.add_argument("--epochs", type=int, default=None)
    result.add_argument(
        "--swa-lr",
        type=float,
        default=0.02,
        help="the constant learning rate of the last epochs, which SWA averages",
    )
    result.add_argument("--ema-decay", type=float, default=0.99)
    result.add_argument("--seed", type=int, default=0)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])

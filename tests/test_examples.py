"""The examples run, in their `--smoke` mode, and show what they claim.

`digits_cnn.py` runs as the command a user types (a subprocess); the others are
imported and their `main(argv)` called, which is quicker and lets the test read the
numbers they return. Every example prints its runtime, one progress line per epoch
when its output is not a terminal (as here), and writes only under `--out`.
"""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest
from helpers import flax_promotion

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.examples
@pytest.mark.subprocess
def test_digits_cnn_smoke_runs_as_a_command(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "digits_cnn.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "held-out accuracy:" in result.stdout
    assert "epoch 1/2: train_loss" in result.stdout
    assert "epoch 2/2: train_loss" in result.stdout
    assert "digits_cnn: runtime" in result.stdout
    png = tmp_path / "digits_cnn.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Two epochs of 8 steps already learn something (chance is 10%; ~54% seen).
    accuracy = float(result.stdout.split("held-out accuracy:")[1].split()[0])
    assert accuracy > 0.3


@pytest.mark.examples
def test_seed_mlp_matches_flax(capsys, tmp_path):
    example = load_example("seed_mlp")
    with flax_promotion():  # the Flax half of the example needs standard promotion
        out = example.main(["--smoke", "--out", str(tmp_path)])
    assert out["flax"]
    assert set(out["diffs"]) == {"train_loss", "mean", "var", "eval_loss", "pred"}
    # One step of each: identical up to float32 rounding.
    assert max(out["diffs"].values()) < 1e-6
    printed = capsys.readouterr().out
    assert "'batch_stats': {'BatchNorm_0'" in printed  # Flax's variables
    assert "State(SeedMLP.norm.state_index=RunningStats(" in printed
    assert "epoch 1/1: train_loss" in printed and "seed_mlp: runtime" in printed
    assert json.loads((tmp_path / "seed_mlp.json").read_text())["eqx_bn"]["var"]


@pytest.mark.examples
def test_seed_mlp_without_flax_is_strict_clean(capsys, tmp_path):
    example = load_example("seed_mlp")
    # No standard-promotion context: only eqx_bn code runs, under strict promotion.
    out = example.main(["--no-flax", "--out", str(tmp_path)])
    assert not out["flax"] and out["diffs"] == {}
    assert "Flax is not installed" in capsys.readouterr().out


@pytest.mark.examples
def test_flax_to_equinox_carries_on(tmp_path, capsys):
    example = load_example("flax_to_equinox")
    with flax_promotion():
        out = example.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "flax_seed_mlp.msgpack").stat().st_size > 0
    # The converted model evaluates exactly as Flax did at the checkpoint ...
    assert out["first_eval"] == pytest.approx(out["flax_last"], rel=1e-6)
    # ... and Equinox's continuation, momentum included, ends where Flax's own
    # would have; restarting the optimiser (momentum lost) would not.
    assert out["eqx_end"] == pytest.approx(out["flax_end"], rel=1e-5)
    gap = abs(out["eqx_end"] - out["flax_end"])
    assert abs(out["fresh_end"] - out["flax_end"]) > 100 * max(gap, 1e-9)
    steps = [step for who, step, _ in out["log"] if who == "Equinox"]
    assert steps[0] == 20 and steps[-1] == 40  # step numbering carries on
    # Handed back: Flax restores the Equinox run at its step and loss.
    assert out["back_step"] == 40
    assert out["flax_back"] == pytest.approx(out["eqx_end"], rel=1e-6)
    printed = capsys.readouterr().out
    assert "epoch 2/2: step 40" in printed and "flax_to_equinox: runtime" in printed


@pytest.mark.examples
def test_stateful_ensembles_progress_and_outputs(tmp_path, capsys):
    example = load_example("stateful_ensembles")
    with flax_promotion():  # optax.adam's bias correction: float ** int32 step
        out = example.main(["--smoke", "--out", str(tmp_path)])
    history = json.loads((tmp_path / "stateful_ensembles.json").read_text())
    assert history["member_losses_per_step"] == out["history"]
    assert len(out["history"]) == 5 and len(out["history"][0]) == 4
    assert all(math.isfinite(v) for v in out["history"][-1])
    assert out["loss"] < sum(out["history"][0]) / 4  # the members learn
    printed = capsys.readouterr().out
    assert "epoch 1/1: mean_loss" in printed
    assert "stateful_ensembles: runtime" in printed


@pytest.mark.examples
def test_data_parallel_compiles_its_step_once(tmp_path, monkeypatch, capsys):
    """The example used to build a new `jax.jit` every step (minutes for 50 steps).
    On this process's one device the mesh has one device; what is counted is how
    often the step is traced: once per training run (4 runs), not once per step."""
    example = load_example("data_parallel")
    traced = []
    local_step = example.local_step

    def counting(*args):
        traced.append(1)
        return local_step(*args)

    monkeypatch.setattr(example, "local_step", counting)
    with flax_promotion():
        out = example.main(["--devices=1", "--steps", "6", "--out", str(tmp_path)])
    assert len(traced) == 4
    assert all(style["equal"] for style in out["styles"].values())
    assert len(next(iter(out["styles"].values()))["loss"]) == 6
    saved = json.loads((tmp_path / "data_parallel.json").read_text())
    assert saved["styles"] == out["styles"]
    printed = capsys.readouterr().out
    assert "epoch 2/2: loss" in printed and "data_parallel: runtime" in printed


@pytest.mark.examples
def test_after_training_averages_recalibrates_and_freezes(tmp_path, capsys):
    example = load_example("after_training")
    out = example.main(["--smoke", "--out", str(tmp_path)])
    results = out["results"]
    assert list(results) == [
        "last model",
        "SWA, stale statistics",
        "SWA, recalibrated",
        "EMA, averaged statistics",
        "EMA, recalibrated",
        "fine-tuned, live BatchNorm",
        "fine-tuned, frozen BatchNorm",
    ]
    assert all(0.0 <= v <= 1.0 for v in results.values())
    # Two epochs of 8 steps already learn something (chance is 10%).
    assert results["SWA, recalibrated"] > 0.3
    saved = json.loads((tmp_path / "after_training.json").read_text())
    assert saved == results
    png = tmp_path / "after_training.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "epoch 2/2: train_loss" in printed and "after_training: runtime" in printed
    assert "SWA, recalibrated" in printed


@pytest.mark.parametrize(
    "name",
    [
        "seed_mlp",
        "digits_cnn",
        "flax_to_equinox",
        "stateful_ensembles",
        "data_parallel",
        "after_training",
    ],
)
def test_help_states_where_outputs_go(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_example(name).main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "--out" in printed and "default: ./outputs" in " ".join(printed.split())
    assert "runtime" not in printed  # nothing ran


def test_data_parallel_help_says_what_each_flag_is(capsys):
    """Issue 21 item 4: `--per-device` was described as "examples/device", which
    reads as a path."""
    with pytest.raises(SystemExit):
        load_example("data_parallel").main(["--help"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "examples/device" not in printed
    assert "--per-device PER_DEVICE examples per device in each batch (default: 4)" in (
        printed
    )
    assert "--steps STEPS training steps (default: 50" in printed
    assert "--devices DEVICES devices in the mesh (default: 8)" in printed

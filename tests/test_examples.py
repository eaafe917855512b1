"""The examples run, in their `--smoke` mode, and show what they claim.

`digits_cnn.py` runs as the command a user types (a subprocess); the others are
imported and their `main(argv)` called, which is quicker and lets the test read the
numbers they return.
"""

import importlib.util
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
    png = tmp_path / "digits_cnn.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Two epochs of 8 steps already learn something (chance is 10%; ~54% seen).
    accuracy = float(result.stdout.split("held-out accuracy:")[1].split()[0])
    assert accuracy > 0.3


def test_seed_mlp_matches_flax(capsys):
    example = load_example("seed_mlp")
    with flax_promotion():  # the Flax half of the example needs standard promotion
        out = example.main(["--smoke"])
    assert out["flax"]
    assert set(out["diffs"]) == {"train_loss", "mean", "var", "eval_loss", "pred"}
    # One step of each: identical up to float32 rounding.
    assert max(out["diffs"].values()) < 1e-6
    printed = capsys.readouterr().out
    assert "'batch_stats': {'BatchNorm_0'" in printed  # Flax's variables
    assert "State(SeedMLP.norm.state_index=RunningStats(" in printed


def test_seed_mlp_without_flax_is_strict_clean(capsys):
    example = load_example("seed_mlp")
    # No standard-promotion context: only eqx_bn code runs, under strict promotion.
    out = example.main(["--no-flax"])
    assert not out["flax"] and out["diffs"] == {}
    assert "Flax is not installed" in capsys.readouterr().out


def test_flax_to_equinox_carries_on(tmp_path):
    example = load_example("flax_to_equinox")
    with flax_promotion():
        out = example.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "flax_seed_mlp.msgpack").stat().st_size > 0
    # The converted model evaluates exactly as Flax did at the checkpoint ...
    assert out["first_eval"] == pytest.approx(out["flax_last"], rel=1e-6)
    # ... and Equinox's continuation ends where Flax's own would have.
    assert out["eqx_end"] == pytest.approx(out["flax_end"], rel=1e-5)
    steps = [step for who, step, _ in out["log"] if who == "Equinox"]
    assert steps[0] == 20 and steps[-1] == 40  # step numbering carries on

"""`eqx-bn-convert` / `python -m eqx_bn.interop` on checkpoints written by Flax."""

import re
import subprocess
import sys
from typing import Any

import equinox as eqx
import flax.linen as nn
import flax.serialization as fser
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import checkpoints, train_state
from helpers import flax_promotion

from eqx_bn.interop import cli, export_torch

PROG = "eqx-bn-convert"

MODELS = """
import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_bn


class MLP(eqx.Module):
    dense_0: eqx.nn.Linear
    norm: eqx_bn.BatchNorm
    dense_1: eqx.nn.Linear

    def __init__(self, key):
        k0, k1 = jax.random.split(key)
        self.dense_0 = eqx.nn.Linear(3, 4, key=k0)
        self.norm = eqx_bn.BatchNorm(4, axis_name=None, momentum=0.9)
        self.dense_1 = eqx.nn.Linear(4, 2, key=k1)

    def __call__(self, x, state):
        x, state = self.norm(jax.vmap(self.dense_0)(x), state)
        return jax.vmap(self.dense_1)(jax.nn.relu(x)), state


def make():
    return eqx.nn.make_with_state(MLP)(jax.random.key(1))


def make_model_only():
    return make()[0]


not_callable = 3
"""


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(2)(nn.relu(x))


class TrainState(train_state.TrainState):
    batch_stats: Any


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The directory holding `cli_models.py`, importable as a module."""
    directory = tmp_path_factory.mktemp("models")
    (directory / "cli_models.py").write_text(MODELS)
    sys.path.insert(0, str(directory))
    try:
        import cli_models

        yield directory, cli_models
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("cli_models", None)


@pytest.fixture(scope="module")
def flax_model():
    """Flax variables after one training step (so the running stats are not 0/1),
    a test batch and Flax's inference output on it."""
    x = jax.random.normal(jax.random.key(0), (8, 3))
    # Jitted: one compilation each instead of one per operation.
    init = jax.jit(FlaxMLP().init, static_argnames="train")
    apply = jax.jit(FlaxMLP().apply, static_argnames=("train", "mutable"))
    with flax_promotion():
        variables = init(jax.random.key(2), x, train=False)
        _, updates = apply(variables, 3 * x + 1, train=True, mutable="batch_stats")
        variables = {"params": variables["params"], **updates}
        y = apply(variables, x, train=False)
    return jax.device_get(variables), x, y


@pytest.fixture(scope="module")
def msgpack_file(flax_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "flax.msgpack"
    path.write_bytes(fser.to_bytes(flax_model[0]))
    return path


def run(capsys, *args):
    status = cli.main([str(a) for a in args], prog=PROG)
    return status, capsys.readouterr().err


def assert_matches_flax(output, flax_model, module):
    _, x, y = flax_model
    model, state = eqx.tree_deserialise_leaves(output, module.make())
    got, _ = eqx.nn.inference_mode(model)(x, state)
    np.testing.assert_allclose(got, y, rtol=1e-6, atol=1e-6)
    # Not a coincidence of the initial weights.
    fresh, _ = eqx.nn.inference_mode(module.make()[0])(x, module.make()[1])
    assert not np.allclose(fresh, y, atol=1e-2)


def test_converts_msgpack(models, flax_model, msgpack_file, tmp_path, capsys):
    output = tmp_path / "model.eqx"
    status, err = run(capsys, msgpack_file, output, "--model", "cli_models:make", "-q")
    assert (status, err) == (0, "")
    assert_matches_flax(output, flax_model, models[1])


def test_converts_orbax_train_state(models, flax_model, msgpack_file, tmp_path, capsys):
    variables = flax_model[0]
    state = TrainState.create(
        apply_fn=None,
        params=variables["params"],
        tx=optax.adam(1e-3),
        batch_stats=variables["batch_stats"],
    )
    checkpoints.save_checkpoint(tmp_path / "ckpts", state, step=5)
    ckpt = tmp_path / "ckpts" / "checkpoint_5"
    output = tmp_path / "model.eqx"
    status, err = run(capsys, ckpt, output, "--model", "cli_models:make", "-q")
    assert status == 2 and not output.exists()
    assert err.startswith(f"{PROG}: error: Cannot load the Flax variables into MLP")
    assert "opt_state" in err and "step" in err and "Traceback" not in err
    assert err.endswith("On the command line, pass `--ignore-extra`.\n")

    status, err = run(
        capsys, ckpt, output, "--model", "cli_models:make", "--ignore-extra"
    )
    assert status == 0
    assert f"read {ckpt}" in err and "loaded into MLP" in err and "wrote" in err
    assert_matches_flax(output, flax_model, models[1])
    # Bit for bit what the msgpack file of the same variables gives.
    run(capsys, msgpack_file, tmp_path / "m.eqx", "--model", "cli_models:make", "-q")
    assert output.read_bytes() == (tmp_path / "m.eqx").read_bytes()


def test_progress_bar_and_plain_progress(
    models, msgpack_file, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(cli, "_PROGRESS_MIN_BYTES", 0)
    args = (msgpack_file, tmp_path / "o.eqx", "--model", "cli_models:make")
    status, err = run(capsys, *args)
    assert status == 0 and "reading: 100%" in err and "B/s" in err  # tqdm's bar
    monkeypatch.setitem(sys.modules, "tqdm", None)
    status, err = run(capsys, *args)
    assert status == 0 and "reading: 100% of" in err and "B/s" not in err
    status, err = run(capsys, *args, "--quiet")
    assert (status, err) == (0, "")


def _bad_checkpoint(tmp_path):
    path = tmp_path / "bad.msgpack"
    path.write_bytes(b"\x82\xa6params\x81")
    return path


@pytest.mark.parametrize(
    "checkpoint, model, output, message",
    [
        (_bad_checkpoint, "cli_models:make", "o.eqx", "bad.msgpack' is truncated"),
        (None, "cli_models:make", "o.eqx", "no such checkpoint file or directory"),
        ("good", "cli_models", "o.eqx", "expected MODULE:FACTORY"),
        ("good", "no_such_module_4f2:make", "o.eqx", "no module named"),
        ("good", "cli_models:nope", "o.eqx", "cli_models has no 'nope'"),
        ("good", "cli_models:not_callable", "o.eqx", "'not_callable' is not callable"),
        (
            "good",
            "cli_models:make_model_only",
            "o.eqx",
            "returned MLP, expected a tuple",
        ),
        ("good", "missing.py:make", "o.eqx", "no such file 'missing.py'"),
        ("good", "cli_models:make", "no/such/dir/o.eqx", "cannot write.*no directory"),
    ],
)
def test_errors_exit_2_with_one_line(
    checkpoint, model, output, message, models, msgpack_file, tmp_path, capsys
):
    if checkpoint == "good":
        checkpoint = msgpack_file
    elif checkpoint is None:
        checkpoint = tmp_path / "missing.msgpack"
    else:
        checkpoint = checkpoint(tmp_path)
    status, err = run(capsys, checkpoint, tmp_path / output, "--model", model, "-q")
    assert status == 2
    assert err.startswith(f"{PROG}: error: ") and err.count("\n") == 1, err
    assert re.search(message, err)
    assert not (tmp_path / output).exists()


def test_mismatched_model_lists_problems(models, flax_model, tmp_path, capsys):
    variables = flax_model[0]
    params = dict(variables["params"])
    del params["Dense_1"]
    path = tmp_path / "partial.msgpack"
    path.write_bytes(fser.to_bytes({**variables, "params": params}))
    status, err = run(capsys, path, tmp_path / "o.eqx", "--model", "cli_models:make")
    assert status == 2 and "Traceback" not in err
    assert "params/Dense_1/kernel" in err and "model.dense_1.weight" in err


def test_cast_flag(models, flax_model, tmp_path, capsys):
    as_bf16 = jax.tree.map(lambda a: np.asarray(a, jnp.bfloat16), flax_model[0])
    path = tmp_path / "bf16.msgpack"
    path.write_bytes(fser.to_bytes(as_bf16))
    args = (path, tmp_path / "o.eqx", "--model", "cli_models:make", "-q")
    status, err = run(capsys, *args)
    assert status == 2 and err.endswith("On the command line, pass `--cast`.\n")
    assert run(capsys, *args, "--cast") == (0, "")
    model, _ = eqx.tree_deserialise_leaves(tmp_path / "o.eqx", models[1].make())
    kernel = as_bf16["params"]["Dense_0"]["kernel"]
    assert model.dense_0.weight.dtype == jnp.float32
    np.testing.assert_array_equal(model.dense_0.weight, kernel.T.astype(np.float32))


def test_model_file_path_and_own_import_errors(models, msgpack_file, tmp_path, capsys):
    status, _ = run(
        capsys,
        msgpack_file,
        tmp_path / "o.eqx",
        "--model",
        f"{models[0] / 'cli_models.py'}:make",
    )
    assert status == 0
    # A module that fails to import its own dependency shows the real traceback.
    (tmp_path / "broken_models.py").write_text("import not_installed_pkg_9x\n")
    with pytest.raises(ModuleNotFoundError, match="not_installed_pkg_9x"):
        cli.main(
            [str(msgpack_file), "o", "--model", f"{tmp_path / 'broken_models.py'}:f"]
        )


def test_model_file_imports_its_siblings(msgpack_file, tmp_path, capsys):
    """Issue 21.3: `--model path/to/models.py:make` imports the file as Python
    runs it, its folder first on sys.path, so its own `import` of a sibling
    module works (and sys.path is as it was afterwards)."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "sibling_layers_7c.py").write_text(MODELS)
    (folder / "entry_7c.py").write_text("from sibling_layers_7c import make\n")
    before = list(sys.path)
    try:
        output = tmp_path / "o.eqx"
        args = (msgpack_file, output, "--model", f"{folder / 'entry_7c.py'}:make")
        assert run(capsys, *args, "-q") == (0, "")
        assert sys.path == before
    finally:
        sys.modules.pop("sibling_layers_7c", None)


@pytest.mark.parametrize("spelling", ["same", "relative", "link"])
def test_output_that_is_the_checkpoint_is_refused(
    spelling, models, msgpack_file, tmp_path, capsys, monkeypatch
):
    """Issue 21.3: converting a file onto itself would replace the checkpoint;
    it is refused before anything is read or built."""
    checkpoint = tmp_path / "a.msgpack"
    checkpoint.write_bytes(msgpack_file.read_bytes())
    output = checkpoint
    if spelling == "relative":
        monkeypatch.chdir(tmp_path)
        output = "./sub/../a.msgpack"
        (tmp_path / "sub").mkdir()
    elif spelling == "link":
        output = tmp_path / "link.msgpack"
        output.symlink_to(checkpoint)
    status, err = run(capsys, checkpoint, output, "--model", "cli_models:nope")
    assert status == 2 and err.count("\n") == 1, err
    assert "is the checkpoint being converted" in err, err
    assert checkpoint.read_bytes() == msgpack_file.read_bytes()


@pytest.mark.subprocess  # a fresh interpreter: imports JAX and Equinox again
def test_python_dash_m(models, flax_model, msgpack_file, tmp_path):
    directory, module = models
    output = tmp_path / "model.eqx"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "eqx_bn.interop",
            str(msgpack_file),
            str(output),
            "--model",
            "cli_models:make",
        ],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr
    assert_matches_flax(output, flax_model, module)


# -- PyTorch checkpoints ---------------------------------------------------------------


@pytest.fixture
def torch_state_dict(models):
    """The CLI model's state_dict with values no fresh model has, and that model."""
    model, state = models[1].make()
    model = jax.tree.map(lambda a: a + 1 if eqx.is_array(a) else a, model)
    return export_torch(model, state), model


def _torch_save(tmp_path, tree):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save(jax.tree.map(torch.from_numpy, tree), path)
    return path


def _assert_loaded(output, module, expected):
    model, _ = eqx.tree_deserialise_leaves(output, module.make())
    np.testing.assert_array_equal(model.dense_0.weight, expected.dense_0.weight)
    np.testing.assert_array_equal(model.dense_1.bias, expected.dense_1.bias)


@pytest.mark.live  # writes its checkpoints with torch
def test_torch_prefix_flag(models, torch_state_dict, tmp_path, capsys):
    state_dict, expected = torch_state_dict
    wrapped = {f"module.{k}": v for k, v in state_dict.items()}
    path = _torch_save(tmp_path, wrapped)
    output = tmp_path / "o.eqx"
    status, err = run(capsys, path, output, "--model", "cli_models:make", "-q")
    assert status == 2 and not output.exists()
    # Issue 21.3: the flag read from the error's `prefix` field, the sentence's
    # period apart from it.
    assert err.endswith("On the command line, pass `--prefix module.`.\n"), err
    args = (path, output, "--model", "cli_models:make", "--prefix", "module.")
    assert run(capsys, *args, "-q") == (0, "")
    _assert_loaded(output, models[1], expected)


@pytest.mark.live  # writes its checkpoints with torch
def test_torch_training_checkpoint_key_flag(models, torch_state_dict, tmp_path, capsys):
    state_dict, expected = torch_state_dict
    path = _torch_save(tmp_path, {"state_dict": state_dict, "epoch": np.array(3)})
    output = tmp_path / "o.eqx"
    args = (path, output, "--model", "cli_models:make", "-q")
    status, err = run(capsys, *args)
    assert status == 2 and err.count("\n") == 2 and not output.exists()
    # Read from the error's `key` field (issue 22.1), not from its text.
    assert "training checkpoint" in err, err
    assert err.endswith("On the command line, pass `--key state_dict`.\n"), err
    status, err = run(capsys, *args, "--key", "nope")
    assert status == 2 and "'epoch', 'state_dict'" in err, err
    status, err = run(capsys, *args, "--key", "epoch")
    assert status == 2 and "expected a dict" in err, err
    assert run(capsys, *args, "--key", "state_dict") == (0, "")
    _assert_loaded(output, models[1], expected)


@pytest.mark.live
def test_torch_training_checkpoint_with_argparse_args(
    models, torch_state_dict, tmp_path, capsys
):
    """Issue 21.5: torchvision's reference scripts save `args`, an
    `argparse.Namespace`: refused, named, and `--key` reads the model."""
    import argparse

    torch = pytest.importorskip("torch")
    state_dict, expected = torch_state_dict
    path = tmp_path / "checkpoint.pth"
    torch.save(
        {
            "model": jax.tree.map(torch.from_numpy, state_dict),
            "args": argparse.Namespace(lr=0.1, epochs=90),
            "epoch": 3,
        },
        path,
    )
    output = tmp_path / "o.eqx"
    args = (path, output, "--model", "cli_models:make", "-q")
    status, err = run(capsys, *args)
    assert status == 2 and err.count("\n") == 1 and not output.exists(), err
    assert "`argparse.Namespace` at 'args'" in err and "`--key model`" in err, err
    assert run(capsys, *args, "--key", "model") == (0, "")
    _assert_loaded(output, models[1], expected)


def test_key_flag_for_flax(models, flax_model, tmp_path, capsys):
    path = tmp_path / "wrapped.msgpack"
    path.write_bytes(fser.to_bytes({"model": flax_model[0], "step": 3}))
    output = tmp_path / "o.eqx"
    args = (path, output, "--model", "cli_models:make", "--key", "model", "-q")
    assert run(capsys, *args) == (0, "")
    assert_matches_flax(output, flax_model, models[1])


@pytest.mark.live  # writes its checkpoint with torch
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ignore-extra"], "--ignore-extra: only for Flax checkpoints"),
        (["--layout", "linen"], "--layout: only for Flax checkpoints"),
        (["--ignore-extra", "--layout", "auto"], "--ignore-extra and --layout: "),
    ],
)
def test_flax_only_flags_refused_for_torch(
    flags, message, models, torch_state_dict, tmp_path, capsys
):
    path = _torch_save(tmp_path, torch_state_dict[0])
    args = (path, tmp_path / "o.eqx", "--model", "cli_models:make", "-q")
    status, err = run(capsys, *args, *flags)
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert "is a PyTorch checkpoint" in err


def test_torch_only_flag_refused_for_flax(models, msgpack_file, tmp_path, capsys):
    args = (msgpack_file, tmp_path / "o.eqx", "--model", "cli_models:make", "-q")
    status, err = run(capsys, *args, "--prefix", "module.")
    assert status == 2 and "--prefix: only for PyTorch checkpoints" in err, err
    # A missing file is said to be missing, not to be a Flax checkpoint.
    args = (tmp_path / "missing.pt", tmp_path / "o.eqx", "--model", "cli_models:make")
    status, err = run(capsys, *args, "--prefix", "module.")
    assert status == 2 and "no such checkpoint file" in err, err


@pytest.mark.live  # writes its checkpoints with torch
def test_no_progress_bar_for_readers_without_progress(
    models, torch_state_dict, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(cli, "_PROGRESS_MIN_BYTES", 0)
    path = _torch_save(tmp_path, torch_state_dict[0])
    status, err = run(capsys, path, tmp_path / "o.eqx", "--model", "cli_models:make")
    assert status == 0 and "reading" not in err and "B/s" not in err, err

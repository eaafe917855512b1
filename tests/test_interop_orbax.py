"""`eqx_bn.interop` Orbax reading against checkpoints written by Orbax and Flax."""

import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax.training import checkpoints, train_state

from eqx_bn.interop import CheckpointError, read_checkpoint, read_orbax, write_orbax

# Orbax warns when it restores a JAX array without being given a sharding. Our
# reader asks for numpy arrays and never triggers it (the other tests run with
# warnings as errors); only the restores by Orbax/Flax themselves, for comparison, do.
orbax_sharding_warning = pytest.mark.filterwarnings(
    "ignore:Sharding info not provided when restoring:UserWarning"
)


def variables():
    return {
        "params": {
            "Conv_0": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 2, 2, 3)},
            "BatchNorm_0": {
                "scale": jnp.array([0.5, 1.5, np.nan], jnp.bfloat16),
                "bias": jnp.array([-0.0, 1e-30, 2.0], jnp.float32),
            },
        },
        "batch_stats": {
            "BatchNorm_0": {
                "mean": np.array([0.1, 0.2, 0.3], np.float32),
                "var": np.array([1.0, 2.0, 3.0], np.float32),
            }
        },
    }


def assert_same_arrays(got, want, numpy=True):
    """`got` has `want`'s structure, dtypes, shapes and bits (and is all numpy)."""
    assert isinstance(got, dict) and set(got) == set(want)
    for key, value in want.items():
        if isinstance(value, dict):
            assert_same_arrays(got[key], value, numpy)
        else:
            value = np.asarray(value)
            assert not numpy or type(got[key]) is np.ndarray, key
            assert got[key].dtype == value.dtype and got[key].shape == value.shape
            assert got[key].tobytes() == value.tobytes(), key


def test_standard_checkpointer(tmp_path):
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", variables())
    assert_same_arrays(read_orbax(tmp_path / "ckpt"), variables())
    assert_same_arrays(read_checkpoint(str(tmp_path / "ckpt")), variables())


@orbax_sharding_warning
def test_flax_save_checkpoint_of_a_train_state(tmp_path):
    tree = variables()
    state = train_state.TrainState.create(
        apply_fn=None, params=tree["params"], tx=optax.sgd(0.1, momentum=0.9)
    )
    checkpoints.save_checkpoint(
        tmp_path, {"state": state, "batch_stats": tree["batch_stats"]}, step=7
    )
    assert os.listdir(tmp_path) == ["checkpoint_7"]
    got = read_checkpoint(tmp_path / "checkpoint_7")
    assert_same_arrays(got["state"]["params"], tree["params"])
    assert_same_arrays(got["batch_stats"], tree["batch_stats"])
    assert got["state"]["step"] == 0 and type(got["state"]["step"]) is int
    # optax.sgd's (TraceState(trace), EmptyState()) as Flax's own restore gives it.
    restored = checkpoints.restore_checkpoint(tmp_path / "checkpoint_7", None)
    assert set(got["state"]["opt_state"]) == set(restored["state"]["opt_state"])
    assert got["state"]["opt_state"]["1"] is None
    trace = got["state"]["opt_state"]["0"]["trace"]
    assert_same_arrays(trace, zeros_like(tree["params"]))
    # A directory holding exactly one checkpoint is followed into it.
    assert_same_arrays(read_checkpoint(tmp_path)["batch_stats"], tree["batch_stats"])
    checkpoints.save_checkpoint(tmp_path, {"state": state}, step=8, keep=2)
    with pytest.raises(CheckpointError, match="several checkpoints.*checkpoint_7"):
        read_orbax(tmp_path)


def zeros_like(tree):
    return {
        k: zeros_like(v) if isinstance(v, dict) else np.zeros_like(np.asarray(v))
        for k, v in tree.items()
    }


def test_checkpoint_manager_step_directory(tmp_path):
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(5, args=ocp.args.StandardSave(variables()))
        manager.wait_until_finished()
    assert_same_arrays(read_orbax(tmp_path / "5"), variables())
    assert_same_arrays(read_orbax(tmp_path / "5" / "default"), variables())


@orbax_sharding_warning
def test_write_orbax_is_read_by_orbax(tmp_path):
    tree = {**variables(), "step": 3}
    write_orbax(tmp_path / "out", tree)
    restored = ocp.PyTreeCheckpointer().restore(tmp_path / "out")
    assert restored["step"] == 3
    assert_same_arrays(
        {k: restored[k] for k in ("params", "batch_stats")},
        {k: tree[k] for k in ("params", "batch_stats")},
        numpy=False,  # Orbax's own restore gives JAX arrays
    )
    assert read_orbax(tmp_path / "out")["step"] == 3
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_orbax(tmp_path / "out", {"step": 4})
    write_orbax(tmp_path / "out", {"step": 4}, overwrite=True)
    assert read_orbax(tmp_path / "out") == {"step": 4}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("orbax") / "ckpt"
    ocp.PyTreeCheckpointer().save(path, variables())
    return path


def _copy(saved, tmp_path, name="ckpt"):
    return shutil.copytree(saved, tmp_path / name)


def test_missing_or_not_a_directory(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        read_orbax(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no such checkpoint file or directory"):
        read_checkpoint(tmp_path / "missing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file.*read_msgpack"):
        read_orbax(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an Orbax PyTree checkpoint"):
        read_orbax(tmp_path / "empty")
    tmp = _copy(saved, tmp_path, "ckpt.orbax-checkpoint-tmp-1234")
    with pytest.raises(CheckpointError, match="unfinished Orbax save"):
        read_orbax(tmp)


def test_corrupt_metadata(tmp_path, saved):
    path = _copy(saved, tmp_path)
    (path / "_METADATA").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read the Orbax metadata"):
        read_orbax(path)


@pytest.mark.subprocess
def test_missing_array_store(tmp_path, saved):
    # In a subprocess: when one array fails to open, Orbax closes its event loop while
    # TensorStore still holds callbacks for the others, which later raise "Event loop
    # is closed" as unraisable exceptions in whatever test runs next.
    path = _copy(saved, tmp_path)
    for name in os.listdir(path / "d"):
        os.remove(path / "d" / name)
    script = (
        "import sys\n"
        "from eqx_bn.interop import CheckpointError, read_orbax\n"
        "try:\n"
        "    read_orbax(sys.argv[1])\n"
        "except CheckpointError as e:\n"
        "    print('CheckpointError:', e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "CheckpointError: cannot read the Orbax" in result.stdout, result.stderr


def test_missing_orbax_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
    with pytest.raises(ImportError, match=r"pip install 'eqx_bn\[orbax\]'"):
        read_orbax(tmp_path)
    with pytest.raises(ImportError, match=r"eqx_bn\[orbax\]"):
        write_orbax(tmp_path / "x", {"a": 1})

"""`eqx_bn.freeze_batch_norms` / `unfreeze_batch_norms` (issue 23, item 3).

The reference is `tests/data/torch/frozen.npz` (REFERENCES.md section 3): the narrow
torchvision ResNet of `narrow_basic.pt` with every BatchNorm swapped for
`torchvision.ops.FrozenBatchNorm2d`, in train mode: logits and cross-entropy
gradients; and the plain network in eval mode with its BatchNorm weight and bias
gradients (what `affine=False` trains).
"""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_bitwise
from test_interop_torch import _narrow, _train_step, assert_as_accurate

import eqx_bn
from eqx_bn.interop import export_flax, export_torch, load_torch, read_torch
from eqx_bn.train import TrainState, make_train_step

DATA = pathlib.Path(__file__).resolve().parent / "data" / "torch"


@pytest.fixture(scope="module")
def refs():
    return dict(np.load(DATA / "frozen.npz"))


@pytest.fixture(scope="module")
def narrow():
    """The narrow torchvision ResNet in training mode, `narrow_basic.pt` loaded."""
    model, state = _narrow("basic")
    return load_torch(model, state, read_torch(DATA / "narrow_basic.pt"))


def _norms(model):
    is_bn = lambda v: isinstance(v, eqx_bn.BatchNorm)  # noqa: E731
    return [v for v in jax.tree.leaves(model, is_leaf=is_bn) if is_bn(v)]


def _frozen(model):
    return [bn for bn in _norms(model) if bn.frozen is not None]


def _bn_keys(refs, kind):
    return sorted(k.removeprefix(f"{kind}/") for k in refs if k.startswith(f"{kind}/"))


@pytest.mark.slow
def test_frozen_training_step_equals_frozen_batchnorm2d(narrow, refs):
    """In training mode the frozen network gives `FrozenBatchNorm2d`'s logits and
    conv/fc gradients (float32 rounding: torch's own float32 results differ from
    eval-mode BatchNorm by ~2.4e-7), its State comes back unchanged, and its
    frozen scales and biases get a zero gradient."""
    model, state = narrow
    frozen = eqx_bn.freeze_batch_norms(model)
    assert len(_frozen(frozen)) == 12
    x, labels = jnp.asarray(refs["x"]), jnp.asarray(refs["labels"])
    logits, new_state, grads = _train_step(frozen, state, x, labels)
    assert_as_accurate(logits, refs, "frozen_logits")
    assert_bitwise(new_state, state)
    exported = export_torch(grads, state, num_batches_tracked=None)
    keys = _bn_keys(refs, "frozen_grad")
    params = [k for k in exported if not k.endswith(("running_mean", "running_var"))]
    assert sorted(params) == sorted(keys + _bn_keys(refs, "eval_grad"))
    for key in keys:
        assert_as_accurate(exported[key], refs, f"frozen_grad/{key}")
    for layer in _frozen(grads):
        assert not np.any(layer.scale) and not np.any(layer.bias)


@pytest.mark.slow
def test_frozen_training_output_is_the_eval_output_bitwise(narrow, refs):
    """Frozen, training mode, and plain, inference mode: the same computation, so
    the same bits (torch's FrozenBatchNorm2d rounds differently from its eval
    BatchNorm)."""
    model, state = narrow
    x, labels = jnp.asarray(refs["x"]), jnp.asarray(refs["labels"])
    frozen_logits = _train_step(eqx_bn.freeze_batch_norms(model), state, x, labels)[0]
    eval_logits = _train_step(eqx.nn.inference_mode(model), state, x, labels)[0]
    assert_bitwise(frozen_logits, eval_logits)
    assert_as_accurate(eval_logits, refs, "eval_logits")


@pytest.mark.slow
def test_affine_false_trains_scale_and_bias_only(narrow, refs):
    """`affine=False`: statistics frozen, scale and bias trained; their gradients
    are the eval-mode BatchNorm's."""
    model, state = narrow
    frozen = eqx_bn.freeze_batch_norms(model, affine=False)
    x, labels = jnp.asarray(refs["x"]), jnp.asarray(refs["labels"])
    _, new_state, grads = _train_step(frozen, state, x, labels)
    assert_bitwise(new_state, state)
    exported = export_torch(grads, state, num_batches_tracked=None)
    for key in _bn_keys(refs, "eval_grad"):
        assert_as_accurate(exported[key], refs, f"eval_grad/{key}")


def _loss(model, state, batch):
    x, labels = batch
    logits, state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(x, state)
    ce = (
        jax.nn.logsumexp(logits, -1)
        - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    )
    return jnp.mean(ce), (state, None)


@pytest.mark.slow
@pytest.mark.parametrize("affine", [True, False])
def test_train_steps_leave_frozen_leaves_and_state_bit_identical(narrow, refs, affine):
    """AdamW with weight decay through TrainState + make_train_step: the frozen
    scales and biases are no optimiser leaves at all (a zero gradient would still
    be decayed), the State is untouched, the convolutions train. With
    `affine=False` scale and bias train too."""
    model, state = narrow
    frozen = eqx_bn.freeze_batch_norms(model, affine=affine)
    ts = TrainState.create(frozen, state, optax.adamw(1e-2, weight_decay=0.1))
    step = make_train_step(_loss)
    batch = (jnp.asarray(refs["x"]), jnp.asarray(refs["labels"]))
    for _ in range(3):
        ts, _, _ = step(ts, batch)
    assert_bitwise(ts.state, state)
    before, after = _frozen(frozen), _frozen(ts.model)
    for old, new in zip(before, after, strict=True):
        for name in ("scale", "bias"):
            same = np.array_equal(getattr(old, name), getattr(new, name))
            assert same is affine, name
    assert not np.array_equal(ts.model.conv1.weight, frozen.conv1.weight)


def test_trainable_filters_out_the_frozen_affine(narrow):
    model, _ = narrow
    frozen = eqx_bn.freeze_batch_norms(model)
    params = eqx.filter(frozen, eqx_bn.trainable(frozen))
    for layer in _frozen(params):
        assert layer.scale is None and layer.bias is None
    assert params.conv1.weight is frozen.conv1.weight
    # Unfrozen or affine=False: every floating-point array, as eqx.is_inexact_array.
    for m in (model, eqx_bn.freeze_batch_norms(model, affine=False)):
        assert jax.tree.leaves(eqx.filter(m, eqx_bn.trainable(m))) == jax.tree.leaves(
            eqx.filter(m, eqx.is_inexact_array)
        )


@pytest.mark.slow
def test_inference_mode_does_not_undo_the_freeze(narrow, refs):
    """Flipping `eqx.nn.inference_mode` either way keeps a frozen layer frozen."""
    model, state = narrow
    frozen = eqx.nn.inference_mode(eqx_bn.freeze_batch_norms(model), False)
    x, labels = jnp.asarray(refs["x"]), jnp.asarray(refs["labels"])
    logits, new_state, _ = _train_step(frozen, state, x, labels)
    assert_bitwise(new_state, state)
    again = eqx.nn.inference_mode(frozen, True)
    assert_bitwise(_train_step(again, state, x, labels)[0], logits)


def test_unfreeze_gives_back_the_model(narrow):
    model, _ = narrow
    for affine in (True, False):
        frozen = eqx_bn.freeze_batch_norms(model, affine=affine)
        assert eqx.tree_equal(eqx_bn.unfreeze_batch_norms(frozen), model)
    assert eqx.tree_equal(eqx_bn.unfreeze_batch_norms(model), model)


def test_freezing_again_sets_affine(narrow):
    model, _ = narrow
    frozen = eqx_bn.freeze_batch_norms(model)
    assert {layer.frozen for layer in _frozen(frozen)} == {"all"}
    relaxed = eqx_bn.freeze_batch_norms(frozen, affine=False)
    assert len(_frozen(relaxed)) == 12
    assert {layer.frozen for layer in _frozen(relaxed)} == {"statistics"}
    assert eqx.tree_equal(eqx_bn.unfreeze_batch_norms(relaxed), model)


def test_part_of_a_model_freezes_with_tree_at(narrow):
    model, _ = narrow
    part = eqx.tree_at(
        lambda m: m.layer1, model, eqx_bn.freeze_batch_norms(model.layer1)
    )
    assert len(_frozen(part)) == 2 and len(_norms(part)) == 12
    assert all(bn.frozen is None for bn in _norms(part.layer2))


@pytest.mark.slow
def test_frozen_model_exports_and_loads_under_torch_names(narrow):
    """A frozen layer keeps PyTorch's BatchNorm names (FrozenBatchNorm2d's too):
    export gives the unfrozen model's state_dict, which loads back."""
    model, state = narrow
    frozen = eqx_bn.freeze_batch_norms(model)
    plain = export_torch(model, state)
    exported = export_torch(frozen, state)
    assert list(exported) == list(plain)
    for key, value in plain.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    loaded, _ = load_torch(frozen, state, plain)
    assert eqx.tree_equal(loaded, frozen)
    flax_names = export_flax(model, state)
    assert jax.tree.structure(export_flax(frozen, state)) == jax.tree.structure(
        flax_names
    )


@pytest.mark.slow
def test_fold_batch_norms_folds_frozen_layers_in_a_training_model(narrow, refs):
    """A frozen BatchNorm is an affine map in either mode, so a training-mode
    model whose BatchNorms are all frozen folds."""
    model, state = narrow
    frozen = eqx_bn.freeze_batch_norms(model)
    folded = eqx_bn.fold_batch_norms(frozen, state)
    assert not _norms(folded)
    x = jnp.asarray(refs["x"])
    ours = jax.vmap(folded, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )[0]
    assert_as_accurate(ours, refs, "eval_logits")


def test_a_frozen_layer_is_a_batch_norm_built_so():
    """Freezing is the layer's `frozen` configuration (as `inference`, a field of
    the layer): the same class and fields, buildable directly, refused when it is
    not one of its values."""
    bn, state = eqx.nn.make_with_state(eqx_bn.BatchNorm)(3, None, momentum=0.9)
    frozen = eqx_bn.freeze_batch_norms(bn)
    assert type(frozen) is eqx_bn.BatchNorm and frozen.frozen == "all"
    built, _ = eqx.nn.make_with_state(eqx_bn.BatchNorm)(
        3, None, momentum=0.9, frozen="all"
    )
    assert eqx.tree_equal(built, frozen)
    x = jnp.arange(12.0).reshape(4, 3)
    y, new = frozen(x, state)
    assert_bitwise(y, bn(x, state, inference=True)[0])
    assert_bitwise(new, state)
    with pytest.raises(ValueError, match=r"frozen.*'statistics', 'all' or None"):
        eqx_bn.BatchNorm(3, frozen=True)

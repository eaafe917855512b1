"""Flax-trained models loaded into eqx_bn: the seed MLP and a (small) ResNet-18.

Each model is initialised and trained for a few SGD steps in Flax (`mutable=
['batch_stats']`), saved with `flax.serialization.to_bytes`, read back with
`eqx_bn.interop.read_msgpack`, loaded with `load_flax`, and compared with Flax in
eval and in train mode; exporting gives back Flax's variables bit for bit.
"""

import copy
from functools import partial

import equinox as eqx
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax_reference import ResNet18 as FlaxResNet18, SeedMLP as FlaxSeedMLP, init
from helpers import channels_first, eval_batch, flax_promotion, normal, train_batch

from eqx_bn.interop import export_flax, load_flax, read_msgpack
from eqx_bn.models import ResNet18, SeedMLP

RTOL = ATOL = 1e-5


def _train_mode_float64(module, variables, x):
    """Flax's train-mode outputs computed in float64: the exact values, to float32."""
    with jax.enable_x64(True), flax_promotion():
        variables = jax.tree_util.tree_map(
            lambda a: np.asarray(a, np.float64), variables
        )
        apply = jax.jit(partial(module.apply, train=True, mutable=["batch_stats"]))
        out, _ = apply(variables, np.asarray(x, np.float64))
        return np.asarray(out)


class Case:
    """A Flax model trained a few SGD steps, and the Equinox model loaded from it.

    The jitted Flax step also returns the train-mode outputs and updated statistics
    of the variables it starts from, so one extra step gives the train-mode reference
    for the checkpoint without compiling another function.
    """

    def __init__(self, flax_module, make_eqx, x, out_features, steps, exact=False):
        self.module = flax_module
        self.x = x  # Flax layout
        labels = normal((x.shape[0], out_features), seed=7)
        with flax_promotion():
            variables = init(flax_module, x, train=False)
        tx = optax.sgd(0.1)

        @jax.jit
        def step(variables, opt_state):
            def loss(params):
                out, updates = flax_module.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    x,
                    train=True,
                    mutable=["batch_stats"],
                )
                return jnp.mean((out - labels) ** 2), (out, updates["batch_stats"])

            grads, (out, stats) = jax.grad(loss, has_aux=True)(variables["params"])
            updates, opt_state = tx.update(grads, opt_state)
            params = optax.apply_updates(variables["params"], updates)
            return {"params": params, "batch_stats": stats}, opt_state, out

        opt_state = tx.init(variables["params"])
        with flax_promotion():
            for _ in range(steps):
                variables, opt_state, _ = step(variables, opt_state)
            after, _, self.train_out = step(variables, opt_state)
            self.eval_out = jax.jit(flax_module.apply, static_argnames="train")(
                variables, x, train=False
            )
        self.trained = variables
        self.train_stats = after["batch_stats"]
        self.train_exact = (
            _train_mode_float64(flax_module, variables, x) if exact else None
        )
        self.data = flax.serialization.to_bytes(self.trained)
        self.restored = read_msgpack(self.data)
        # An abstract model: the loader needs only shapes and dtypes, and skipping
        # Equinox's random initialisation saves most of the time of this fixture.
        self.layout_last = False
        self._load(make_eqx)

    def _load(self, make_eqx):
        self.eqx_model, self.eqx_state = eqx.filter_eval_shape(make_eqx)
        self.model, self.state = load_flax(
            self.eqx_model, self.eqx_state, self.restored
        )

    def with_channels_last(self, make_eqx) -> "Case":
        """The same Flax checkpoint in a channels-last Equinox model."""
        other = copy.copy(self)
        other.layout_last = True
        other._load(make_eqx)
        return other

    @property
    def x_eqx(self):
        if self.x.ndim > 2 and not self.layout_last:
            return channels_first(self.x)
        return self.x


@pytest.fixture(scope="module")
def mlp():
    x = normal((8, 3))
    make = lambda: eqx.nn.make_with_state(SeedMLP)(3, key=jax.random.key(2))  # noqa: E731
    return Case(FlaxSeedMLP(), make, x, 1, steps=3)


@pytest.fixture(scope="module")
def resnet():
    x = normal((4, 32, 32, 3))
    flax_module = FlaxResNet18(num_classes=10, num_filters=8)
    make = lambda: eqx.nn.make_with_state(ResNet18)(  # noqa: E731
        10, num_filters=8, key=jax.random.key(2)
    )
    return Case(flax_module, make, x, 10, steps=2, exact=True)


@pytest.fixture(scope="module")
def resnet_channels_last(resnet):
    # Flax's own layout: the images go in untransposed.
    return resnet.with_channels_last(
        lambda: eqx.nn.make_with_state(ResNet18)(
            10, num_filters=8, channels_last=True, key=jax.random.key(2)
        )
    )


CASES = [
    "mlp",
    pytest.param("resnet", marks=pytest.mark.slow),
    pytest.param("resnet_channels_last", marks=pytest.mark.slow),
]


@pytest.fixture(params=CASES)
def case(request):
    return request.getfixturevalue(request.param)


def test_training_moved_the_statistics(case):
    # Otherwise the comparisons below would not see batch_stats being loaded.
    for leaf in jax.tree_util.tree_leaves(case.trained["batch_stats"]):
        assert not np.allclose(leaf, 0.0) and not np.allclose(leaf, 1.0)


def test_eval_logits_match_flax(case):
    got = eval_batch(case.model, case.state, case.x_eqx)
    np.testing.assert_allclose(got, case.eval_out, rtol=RTOL, atol=ATOL)


def test_train_mode_outputs_and_statistics_match_flax(case):
    got, state = train_batch(case.model, case.state, case.x_eqx)
    if case.train_exact is None:
        np.testing.assert_allclose(got, case.train_out, rtol=RTOL, atol=ATOL)
    else:
        # Deep in a ResNet, train-mode BatchNorm over a tiny batch (4 images; 1x1
        # pixels in the last stage, so 4 values per channel) amplifies float32
        # rounding: Flax itself is ~1e-4 off its own float64 result on logits of
        # size ~4 (and eqx_bn ~4e-5; different convolution orders, and Flax's
        # unshifted E[x^2] - E[x]^2). So the reference is the float64 result, and
        # eqx_bn must be as close to it as Flax's float32 result is.
        flax_error = np.abs(np.asarray(case.train_out) - case.train_exact).max()
        assert flax_error < 1e-3  # rounding, not a different model
        eqx_error = np.abs(np.asarray(got) - case.train_exact).max()
        assert eqx_error <= flax_error + ATOL
    new_stats = export_flax(case.model, state)["batch_stats"]
    assert jax.tree_util.tree_structure(new_stats) == jax.tree_util.tree_structure(
        case.train_stats
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL),
        new_stats,
        case.train_stats,
    )


def test_round_trip_is_bitwise(case):
    exported = export_flax(case.model, case.state)
    assert jax.tree_util.tree_structure(exported) == jax.tree_util.tree_structure(
        case.restored
    )
    for a, b in zip(
        jax.tree_util.tree_leaves(exported), jax.tree_util.tree_leaves(case.restored)
    ):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    # And Flax reads the exported variables back from its own bytes format.
    again = flax.serialization.from_bytes(
        case.trained, flax.serialization.to_bytes(exported)
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, case.trained)


def test_loaded_leaves_keep_structure_and_dtypes(case):
    before = jax.tree_util.tree_structure((case.eqx_model, case.eqx_state))
    assert jax.tree_util.tree_structure((case.model, case.state)) == before
    for a, b in zip(
        jax.tree_util.tree_leaves((case.model, case.state)),
        jax.tree_util.tree_leaves((case.eqx_model, case.eqx_state)),
    ):
        if isinstance(b, jax.ShapeDtypeStruct):  # not flags such as `inference`
            assert isinstance(a, jax.Array)
            assert a.shape == b.shape and a.dtype == b.dtype

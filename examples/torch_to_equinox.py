"""Convert a torchvision-layout PyTorch ResNet checkpoint to Equinox, fine-tune it on
the digits with PyTorch's BatchNorm semantics, and save it for Equinox and PyTorch.

    python examples/torch_to_equinox.py            # 300 fine-tuning steps
    python examples/torch_to_equinox.py --smoke    # a few steps, for the tests
    python examples/torch_to_equinox.py --out DIR  # where the files are written

The checkpoint: with torch installed, a narrow torchvision ResNet (torchvision's own
`ResNet` class and `BasicBlock`, 8 channels in the stem) saved with `torch.save`,
standing in for a pretrained model; without torch, the one recorded in the
repository (`tests/data/torch/narrow_basic.pt`). Either way it is read with
`eqx_bn.interop.read_torch`, which needs no torch, into
`eqx_bn.models.TorchResNet`, whose fields carry torchvision's names. The
checkpoint's 5-class head is left out (`mapping={"fc": None}`) and a new 10-class
head is trained, as when fine-tuning an ImageNet model. The BatchNorms update their
running statistics as PyTorch's do (`unbiased_running_var=True`, momentum 0.1 in
PyTorch's terms). At the end the model is written with `eqx.tree_serialise_leaves`
and, through `eqx_bn.interop.export_torch`, as a safetensors file that
`torchvision`'s model loads with `load_state_dict`; with torch installed the
example checks that PyTorch then gives the same logits.
"""

import pathlib
import sys

import equinox as eqx
import jax
import numpy as np
import optax
from _common import Progress, digits, parser, runtime

from eqx_bn.interop import export_torch, load_torch, read_torch, write_safetensors
from eqx_bn.models import TorchResNet
from eqx_bn.train import TrainState, make_eval_step, make_train_step

try:
    import torch
    import torchvision
except ImportError:
    torch = None

RECORDED = (
    pathlib.Path(__file__).resolve().parent.parent
    / "tests"
    / "data"
    / "torch"
    / "narrow_basic.pt"
)
LAYERS = (1, 1, 1, 1)
BATCH = 64


def narrow_torchvision_resnet(width: int, num_classes: int):
    """torchvision's ResNet with one BasicBlock per stage and `width` channels in
    the stem (torchvision's constructor fixes 64), built by its own `_make_layer`."""
    block = torchvision.models.resnet.BasicBlock

    class NarrowResNet(torchvision.models.ResNet):
        def __init__(self):
            super().__init__(block, list(LAYERS), num_classes)
            self.inplanes = width
            self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = torch.nn.BatchNorm2d(width)
            for i in range(4):
                stage = self._make_layer(block, width * 2**i, 1, stride=1 + (i > 0))
                setattr(self, f"layer{i + 1}", stage)
            self.fc = torch.nn.Linear(8 * width, num_classes)

    return NarrowResNet()


def make_torch_checkpoint(path: pathlib.Path, width: int = 8) -> None:
    """A narrow torchvision ResNet with a 5-class head, saved with torch.save: a
    stand-in for a downloaded pretrained checkpoint."""
    torch.manual_seed(0)
    torch.save(narrow_torchvision_resnet(width, 5).state_dict(), path)


def load_images(smoke: bool):
    """The digits as 3-channel 24x24 images, channels first as in PyTorch."""
    x_train, y_train, x_test, y_test = digits(256 if smoke else None)

    def rgb(images):  # 8x8 -> 24x24, grey -> RGB
        return np.repeat(np.kron(images, np.ones((3, 3), np.float32))[:, None], 3, 1)

    return rgb(x_train), y_train, rgb(x_test), y_test


def loss_fn(model, state, batch):
    images, labels = batch
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    logits, state = batched(images, state)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (state, logits)


def accuracy(eval_step, ts, x, y) -> float:
    _, (_, logits) = eval_step(ts, (x, y))
    return float(np.mean(np.argmax(logits, axis=-1) == y))


def main(argv=None) -> dict:
    args = parser(__doc__, out_help="the checkpoints").parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with runtime("torch_to_equinox"):
        # 1. A PyTorch checkpoint.
        if torch is not None:
            source = args.out / "torch_resnet.pt"
            make_torch_checkpoint(source)
            print(f"made a torchvision ResNet checkpoint with torch: {source}")
        else:
            source = RECORDED
            print(f"torch is not installed: using the recorded checkpoint {source}")

        # 2. Read it without torch and convert it; the head is replaced.
        state_dict = read_torch(source)
        width = state_dict["conv1.weight"].shape[0]
        key_head, key = jax.random.split(jax.random.key(0))
        # Built abstractly (no random initialisation): the checkpoint fills it ...
        model, state = eqx.filter_eval_shape(
            eqx.nn.make_with_state(TorchResNet),
            "basic",
            LAYERS,
            10,
            width=width,
            key=key,
        )
        # ... except the head, which is left out and replaced by a new one.
        model, state = load_torch(model, state, state_dict, mapping={"fc": None})
        head = eqx.nn.Linear(model.fc.in_features, 10, key=key_head)
        model = eqx.tree_at(lambda m: m.fc, model, head)
        print(
            f"loaded {len(state_dict)} entries into {type(model).__name__} "
            f"(width={width}); new 10-class head"
        )

        # 3. Fine-tune on the digits.
        x_train, y_train, x_test, y_test = load_images(args.smoke)
        steps = 5 if args.smoke else 300
        ts = TrainState.create(model, state, optax.adam(3e-3))
        train_step, eval_step = make_train_step(loss_fn), make_eval_step(loss_fn)
        before = accuracy(eval_step, ts, x_test, y_test)
        rng = np.random.default_rng(0)
        epochs = -(-steps // (len(x_train) // BATCH))
        with Progress(steps, "fine-tuning") as progress:
            for epoch in range(epochs):
                order = rng.permutation(len(x_train))
                for i in range(len(x_train) // BATCH):
                    if int(ts.step) == steps:
                        break
                    idx = order[i * BATCH : (i + 1) * BATCH]
                    ts, loss, _ = train_step(ts, (x_train[idx], y_train[idx]))
                    progress.step()
                progress.epoch(epoch + 1, epochs, loss=float(loss))
        after = accuracy(eval_step, ts, x_test, y_test)
        print(f"held-out accuracy: {before:.3f} before fine-tuning, {after:.3f} after")

        # 4. Save for Equinox, and for PyTorch.
        eqx_path = args.out / "torch_finetuned.eqx"
        eqx.tree_serialise_leaves(eqx_path, (ts.model, ts.state))
        exported = export_torch(ts.model, ts.state, num_batches_tracked=int(ts.step))
        st_path = args.out / "torch_finetuned.safetensors"
        write_safetensors(st_path, exported)
        print(f"saved {eqx_path} and {st_path}")

        torch_diff = None
        if torch is not None:
            # PyTorch reads the exported weights and gives the same eval logits.
            import safetensors.torch

            net = narrow_torchvision_resnet(width, 10)
            net.load_state_dict(safetensors.torch.load_file(st_path))
            net.eval()
            with torch.no_grad():
                theirs = net(torch.from_numpy(x_test)).numpy()
            _, (_, ours) = eval_step(ts, (x_test, y_test))
            torch_diff = float(np.max(np.abs(theirs - np.asarray(ours))))
            print(f"PyTorch on the exported weights: logits within {torch_diff:.1e}")
    return dict(
        source=str(source),
        before=before,
        after=after,
        steps=int(ts.step),
        eqx_path=str(eqx_path),
        safetensors_path=str(st_path),
        torch_diff=torch_diff,
    )


if __name__ == "__main__":
    main(sys.argv[1:])

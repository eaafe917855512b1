"""Makes the PyTorch reference files under `tests/data/torch/` that
`tests/test_interop_torch.py` checks against, so that the tests need no torch.

Run it with torch, torchvision and safetensors installed (`pip install -e ".[torch]"`):

    python tests/data/make_torch_reference.py

It writes:

- `narrow_basic.pt` / `narrow_basic.safetensors`, `narrow_bottleneck.pt`: the
  `state_dict()` of two narrow torchvision ResNets (torchvision's `ResNet` class and
  its `BasicBlock`/`Bottleneck`, with the stem and stage widths scaled down), trained
  two SGD steps, saved with `torch.save` and `safetensors.torch.save_file`;
- `narrow_reference.npz`: an input batch and labels, and for each net the eval-mode
  logits, and one train-mode step (logits, the new running statistics, the gradient
  of the mean cross-entropy for every parameter). Each quantity is computed in
  float64 (stored rounded to float32, the reference) and in float32; `err/...`
  holds the largest difference between the two, the rounding error of PyTorch's own
  float32 computation, `round/...` how far float32 rounding at every layer moves
  the float64 result (see `_Round`), and `terms/...` the size of the terms that
  make each result (see `_term_sizes`): the tests measure eqx_bn's error against
  these;
- `batch_norm.npz`: `torch.nn.BatchNorm2d` (momentum 0.1) on a small batch, in
  float64 and float32 as above: output, running statistics and gradients, for the
  whole batch and for the examples a mask keeps;
- `torchvision_keys.json`: the state_dict names, shapes and dtypes of
  torchvision's `resnet18`, `resnet34`, `resnet50`, `resnext50_32x4d` and
  `wide_resnet50_2`;
- `features.pt` and `features.npz`: a checkpoint dict exercising the reader
  (bfloat16, float16, float8, uint16, views with strides and offsets, a storage
  shared by several tensors, an `nn.Parameter`, nested plain values) and the
  values it must give.
"""

import collections
import copy
import json
import math
import pathlib

import numpy as np
import safetensors.torch
import torch
import torchvision
from torch import nn

OUT = pathlib.Path(__file__).resolve().parent / "torch"


class NarrowResNet(torchvision.models.ResNet):
    """torchvision's ResNet with `width` channels in the stem (64 in torchvision)
    and `width * 2**i` planes in `layer{i+1}`, built with torchvision's own
    `_make_layer` and initialisation; `kwargs` go to torchvision's `ResNet`
    (`groups`, `width_per_group` for a ResNeXt or a wide ResNet)."""

    def __init__(self, block, layers, num_classes, width, **kwargs):
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


NETS = {
    "basic": (torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], 2),
    "bottleneck": (torchvision.models.resnet.Bottleneck, [1, 1, 1, 1], 1),
}
NUM_CLASSES = 5


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _train_step(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """One train-mode step: logits, new running statistics, gradients."""
    net.train()
    net.zero_grad()
    logits = net(x)
    nn.functional.cross_entropy(logits, labels).backward()
    out = {"train_logits": _numpy(logits)}
    for name, buf in net.named_buffers():
        if not name.endswith("num_batches_tracked"):
            out[f"state/{name}"] = _numpy(buf)
    for name, p in net.named_parameters():
        out[f"grad/{name}"] = _numpy(p.grad)
    return out


def _with_error(f64: dict, f32: dict, prefix: str, rounded=(), terms=None) -> dict:
    """The float64 values as float32 references, float32's error per entry, the
    largest effect of modelled float32 rounding (see `_Round`) and the size of the
    terms summed (see `_term_sizes`) per entry."""
    out = {}
    for k, ref in f64.items():
        out[f"{prefix}{k}"] = ref.astype(np.float32)
        out[f"{prefix}err/{k}"] = np.float64(np.max(np.abs(f32[k] - ref)))
        if rounded:
            spread = max(np.max(np.abs(r[k] - ref)) for r in rounded)
            out[f"{prefix}round/{k}"] = np.float64(spread)
        if terms is not None:
            out[f"{prefix}terms/{k}"] = np.float64(terms[k])
    return out


def _term_sizes(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict:
    """For each result, the largest sum of the absolute values of the terms that a
    float32 reduction adds up to make one of its elements (a logit, a running
    statistic, a gradient entry). Rounding in such a sum costs a few float32
    epsilons of it, however much the terms cancel: the gradient of a convolution
    before a BatchNorm is often thousands of times smaller than its terms."""
    net = copy.deepcopy(net).to(torch.float64)
    seen: dict[str, list] = {}

    def hook(name):
        def save(module, inputs, output):
            seen[name] = [inputs[0].detach()]
            output.register_hook(lambda g: seen[name].append(g.detach()))
            return output.clone()  # later in-place ops (relu, +=) act on the copy

        return save

    layers = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    for name, m in net.named_modules():
        if isinstance(m, layers):
            m.register_forward_hook(hook(name))
    out = {}
    for mode in ("eval", "train"):
        seen.clear()
        net.train(mode == "train")
        logits = net(x)
        fc_in = seen["fc"][0].abs()
        sizes = (fc_in @ net.fc.weight.abs().T + net.fc.bias.abs()).detach()
        out[f"{mode}_logits"] = float(sizes.max())
    net.zero_grad()
    nn.functional.cross_entropy(logits, labels).backward()
    for name, m in net.named_modules():
        if not isinstance(m, layers):
            continue
        inp, grad = seen[name][0].abs(), seen[name][1].abs()
        if isinstance(m, nn.Conv2d):
            w = nn.grad.conv2d_weight(
                inp, m.weight.shape, grad, m.stride, m.padding, m.dilation, m.groups
            )
            out[f"grad/{name}.weight"] = float(w.max())
        elif isinstance(m, nn.Linear):
            out[f"grad/{name}.weight"] = float((grad.T @ inp).max())
            out[f"grad/{name}.bias"] = float(grad.sum(0).max())
        else:
            x_in = seen[name][0]
            mean = x_in.mean((0, 2, 3), keepdim=True)
            xhat = (x_in - mean) / (x_in.var((0, 2, 3), keepdim=True) + m.eps).sqrt()
            out[f"grad/{name}.weight"] = float((grad * xhat.abs()).sum((0, 2, 3)).max())
            out[f"grad/{name}.bias"] = float(grad.sum((0, 2, 3)).max())
            old = (m.running_mean - 0.1 * mean.flatten()) / 0.9  # before the step
            out[f"state/{name}.running_mean"] = float(
                (0.9 * old.abs() + 0.1 * inp.mean((0, 2, 3))).max()
            )
            out[f"state/{name}.running_var"] = float(m.running_var.abs().max())
    return out


EPS32 = float(np.finfo(np.float32).eps)


class _Round(torch.autograd.Function):
    """float32 rounding modelled in float64: the given error on a layer's output,
    and a random relative error of `scale` on its gradient going back.

    PyTorch's CPU kernels accumulate BatchNorm's sums (forward and backward) in
    float64, so its float32 error says little about how accurate a float32
    computation can be. How far the float64 result moves under these rounding
    errors at every layer does: a computation is "correct within float32 rounding"
    when its error is of that size.
    """

    @staticmethod
    def forward(ctx, x, noise, scale):
        ctx.scale = scale
        return x + noise

    @staticmethod
    def backward(ctx, grad):
        noise = ctx.scale * (2 * torch.rand_like(grad) - 1)
        return grad * (1 + noise), None, None


def _rounding(module: nn.Module, inputs: tuple, output: torch.Tensor):
    """A forward hook: the typical rounding error of a float32 layer, `sqrt(K)`
    epsilons of the sum of the absolute values of the `K` terms of each output of
    a convolution or linear layer, one epsilon of the others' outputs."""
    x = inputs[0]
    if isinstance(module, nn.Conv2d):
        k = module.in_channels // module.groups * math.prod(module.kernel_size)
        size = nn.functional.conv2d(
            x.abs(),
            module.weight.abs(),
            None,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
        )
    elif isinstance(module, nn.Linear):
        k = module.in_features
        size = x.abs() @ module.weight.abs().T + module.bias.abs()
    else:
        k, size = 1, output.abs()
    scale = EPS32 * math.sqrt(k)
    noise = scale * size.detach() * (2 * torch.rand_like(output) - 1)
    return _Round.apply(output, noise, scale)


def _rounded_copy(net: nn.Module) -> nn.Module:
    net = copy.deepcopy(net).to(torch.float64)
    for m in net.modules():
        if not list(m.children()):
            m.register_forward_hook(_rounding)
    return net


def _results(net: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict:
    net.eval()
    with torch.no_grad():
        res = {"eval_logits": _numpy(net(x))}
    res.update(_train_step(net, x, labels))
    return res


def narrow_nets(gen: torch.Generator) -> dict:
    # 24x24: 12 after the stem, 6 after the pool, then 3, 2 (odd, padded) and 1.
    x = torch.randn(4, 3, 24, 24, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
    arrays = {"x": _numpy(x), "labels": _numpy(labels).astype(np.int32)}
    for name, (block, layers, width) in NETS.items():
        torch.manual_seed(len(name))
        net = NarrowResNet(block, layers, NUM_CLASSES, width)
        # Give every BatchNorm parameters and statistics away from 1 and 0.
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.uniform_(-0.3, 0.3, generator=gen)
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        for _ in range(2):
            batch = torch.randn(8, 3, 24, 24, generator=gen)
            targets = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
            opt.zero_grad()
            nn.functional.cross_entropy(net(batch), targets).backward()
            opt.step()
        state_dict = net.state_dict()
        torch.save(state_dict, OUT / f"narrow_{name}.pt")
        if name == "basic":
            safetensors.torch.save_file(
                {k: v.contiguous() for k, v in state_dict.items()},
                OUT / f"narrow_{name}.safetensors",
                metadata={"made_by": "make_torch_reference.py"},
            )
        results = {}
        for dtype in (torch.float64, torch.float32):
            copied = copy.deepcopy(net).to(dtype)
            results[dtype] = _results(copied, x.to(dtype), labels)
        rounded = []
        for seed in range(3):
            torch.manual_seed(seed)
            rounded.append(_results(_rounded_copy(net), x.double(), labels))
        terms = _term_sizes(net, x.double(), labels)
        arrays.update(
            _with_error(
                results[torch.float64],
                results[torch.float32],
                f"{name}/",
                rounded,
                terms,
            )
        )
    return arrays


def batch_norm(gen: torch.Generator) -> dict:
    x = torch.randn(6, 3, 4, 5, generator=gen) * 2 + 1
    dy = torch.randn(6, 3, 4, 5, generator=gen)
    weight = torch.rand(3, generator=gen) + 0.5
    bias = torch.randn(3, generator=gen)
    mean0 = torch.randn(3, generator=gen)
    var0 = torch.rand(3, generator=gen) + 0.5
    keep = torch.tensor([True, True, False, True, False, True])
    arrays = {
        "x": _numpy(x),
        "dy": _numpy(dy),
        "weight": _numpy(weight),
        "bias": _numpy(bias),
        "running_mean0": _numpy(mean0),
        "running_var0": _numpy(var0),
        "keep": _numpy(keep),
    }
    for case, rows in (("full", slice(None)), ("masked", keep)):
        results = {}
        for dtype in (torch.float64, torch.float32):
            bn = nn.BatchNorm2d(3).to(dtype)
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
                bn.running_mean.copy_(mean0)
                bn.running_var.copy_(var0)
            xs = x[rows].to(dtype).requires_grad_()
            y = bn(xs)
            y.backward(dy[rows].to(dtype))
            results[dtype] = {
                "y": _numpy(y),
                "running_mean": _numpy(bn.running_mean),
                "running_var": _numpy(bn.running_var),
                "dx": _numpy(xs.grad),
                "dweight": _numpy(bn.weight.grad),
                "dbias": _numpy(bn.bias.grad),
            }
        arrays.update(
            _with_error(results[torch.float64], results[torch.float32], f"{case}/")
        )
    return arrays


def features(gen: torch.Generator) -> dict:
    base = torch.randn(4, 6, generator=gen)
    parameter = nn.Parameter(torch.randn(3, generator=gen))
    tensors = collections.OrderedDict(
        base=base,
        transposed=base.t(),  # strides (1, 6), shares base's storage
        rows=base[1:3],  # storage offset 6
        columns=base[:, 2:5],  # offset 2, non-contiguous
        bf16=torch.randn(5, generator=gen).to(torch.bfloat16),
        f16=torch.randn(2, 2, generator=gen).to(torch.float16),
        f8=torch.randn(4, generator=gen).to(torch.float8_e4m3fn),
        u16=torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
        i64_scalar=torch.tensor(7),
        flags=torch.tensor([True, False]),
        empty=torch.zeros(0, 3),
        parameter=parameter,
    )
    checkpoint = {
        "state_dict": tensors,
        "epoch": 3,
        "meta": {"name": "narrow", "lr": 0.1, "tags": ["a", 1], "none": None},
        "shape": (2, 3),
    }
    torch.save(checkpoint, OUT / "features.pt")
    expected = {}
    for k, v in tensors.items():
        v = v.detach()
        if v.dtype == torch.bfloat16:
            expected[k] = _numpy(v.view(torch.int16)).view(np.uint16)
        elif v.dtype == torch.float8_e4m3fn:
            expected[k] = _numpy(v.view(torch.uint8))
        else:
            expected[k] = _numpy(v)
    return expected


def torchvision_keys() -> dict:
    out = {}
    names = (
        "resnet18",
        "resnet34",
        "resnet50",
        "resnext50_32x4d",
        "wide_resnet50_2",
    )
    for name in names:
        with torch.device("meta"):  # names and shapes only
            net = getattr(torchvision.models, name)()
        out[name] = {
            k: [list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in net.state_dict().items()
        }
    return out


def main() -> None:
    OUT.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    np.savez(OUT / "narrow_reference.npz", **narrow_nets(gen))
    np.savez(OUT / "batch_norm.npz", **batch_norm(gen))
    np.savez(OUT / "features.npz", **features(gen))
    with open(OUT / "torchvision_keys.json", "w") as f:
        json.dump(torchvision_keys(), f, indent=0)
    for path in sorted(OUT.iterdir()):
        print(f"{path.name}: {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()

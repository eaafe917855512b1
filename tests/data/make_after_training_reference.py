"""Makes the PyTorch references for issue 23 ("After training: recalibrate, freeze and
average") under `tests/data/torch/`, so that its tests need no torch. The semantics
each file pins down are written out, with citations, in `tests/data/REFERENCES.md`.

Run it with torch and torchvision installed (`pip install -e ".[torch]"`):

    python tests/data/make_after_training_reference.py

Every float quantity is computed twice, in float64 (stored rounded to float32: the
reference) and in float32 (PyTorch's own float32 result); `.../err/<name>` holds the
largest difference between the two, as in `make_torch_reference.py` (the tests allow
a few times that, see `assert_as_accurate` in `tests/test_interop_torch.py`).
Integer quantities (`num_batches_tracked`, `n_averaged`) are stored as int64, after
checking that both precisions agree on them.

It writes:

- `cma.npz`: `nn.BatchNorm2d(3, momentum=None)` (cumulative moving average) over
  training steps of varying batch size, from fresh statistics (`fresh/`) and from
  loaded ones with `num_batches_tracked=3` (`resumed/`): each step's input, output
  and the running mean, variance and `num_batches_tracked` after it;
- `update_bn.npz`: `torch.optim.swa_utils.update_bn` on the narrow torchvision
  ResNet of `narrow_basic.pt` (made by `make_torch_reference.py`) over three batches
  of 4, 4 and 3 images: every BatchNorm's statistics after it, the eval logits
  after it, and the pooled population statistics of every BatchNorm's input over
  all the images (`population/`, which PyTorch does not offer);
- `frozen.npz`: the same network with every BatchNorm replaced by
  `torchvision.ops.FrozenBatchNorm2d`: train-mode logits and cross-entropy
  gradients (the conv and fc weights': FrozenBatchNorm2d has no parameters); beside
  it, the plain network in eval mode: logits and the gradients of the BatchNorm
  weights and biases (what `affine=False` would train). The script checks that an
  SGD step with weight decay leaves every frozen buffer bit-identical and that the
  frozen network's output does not depend on its mode;
- `averaging.npz`: a tiny Conv-BN-ReLU net (`TinyNet`) trained 100 SGD steps
  (batches from NumPy's `RandomState`, not stored, see `_batches`): the whole
  `state_dict` after every step (`trajectory/<name>`, stacked, step 0 the initial
  one: float32 as trained, no `err/`); `AveragedModel(use_buffers=True,
  multi_avg_fn=get_ema_multi_avg_fn(0.99))` updated after every step, its
  `state_dict` and `n_averaged` after steps 1, 2, 10, 50, 100 (`ema/<step>/`); the
  SWA average (`AveragedModel` defaults, updated after steps 51-100:
  `swa/averaged/`, `swa/n_averaged`), then `update_bn` over the first 4 training
  batches (`swa/recalibrated/`: the BatchNorm buffers; `swa/eval_logits` on
  `x_eval`); the same `update_bn` on the EMA model (`ema_update_bn/`).
"""

import copy
import pathlib
import sys

import numpy as np
import torch
import torchvision
from torch import nn
from torch.optim import swa_utils

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from make_torch_reference import (  # noqa: E402
    NETS,
    NUM_CLASSES,
    NarrowResNet,
    _with_error,
)

DATA = pathlib.Path(__file__).resolve().parent / "torch"
DTYPES = (torch.float64, torch.float32)


def _numpy(t: torch.Tensor) -> np.ndarray:
    # A copy: `.numpy()` shares the tensor's memory, which later steps overwrite.
    return t.detach().cpu().numpy().copy()


def _split(results: dict, prefix: str) -> dict:
    """`{dtype: {name: array}}` -> float references with `err/`, integers as int64
    (which both precisions must agree on)."""
    f64, f32 = results[torch.float64], results[torch.float32]
    floats = [k for k, v in f64.items() if np.issubdtype(v.dtype, np.floating)]
    out = _with_error({k: f64[k] for k in floats}, {k: f32[k] for k in floats}, prefix)
    for k, v in f64.items():
        if k not in floats:
            assert np.array_equal(v, f32[k]), (k, v, f32[k])
            out[f"{prefix}{k}"] = v.astype(np.int64)
    return out


def _bn_buffers(net: nn.Module) -> dict:
    out = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out[f"{name}.running_mean"] = _numpy(m.running_mean)
            out[f"{name}.running_var"] = _numpy(m.running_var)
            out[f"{name}.num_batches_tracked"] = _numpy(m.num_batches_tracked)
    return out


# ------------------------------------------------------------------------- 1. CMA

CMA_SIZES = {"fresh": (4, 2, 5, 3, 1), "resumed": (3, 6, 2)}


def cma() -> dict:
    gen = torch.Generator().manual_seed(231)
    weight = torch.rand(3, generator=gen) + 0.5
    bias = torch.randn(3, generator=gen)
    mean0 = torch.randn(3, generator=gen)
    var0 = torch.rand(3, generator=gen) + 0.5
    arrays = {
        "weight": _numpy(weight),
        "bias": _numpy(bias),
        "resumed/running_mean0": _numpy(mean0),
        "resumed/running_var0": _numpy(var0),
        "resumed/num_batches_tracked0": np.int64(3),
    }
    xs = {
        case: [torch.randn(n, 3, 4, 5, generator=gen) * 2 + 1 for n in sizes]
        for case, sizes in CMA_SIZES.items()
    }
    x_eval = torch.randn(2, 3, 4, 5, generator=gen)
    arrays["x_eval"] = _numpy(x_eval)
    for case, batches in xs.items():
        for i, x in enumerate(batches):
            arrays[f"{case}/x/{i}"] = _numpy(x)
        results = {}
        for dtype in DTYPES:
            bn = nn.BatchNorm2d(3, momentum=None).to(dtype)
            with torch.no_grad():
                bn.weight.copy_(weight)
                bn.bias.copy_(bias)
                if case == "resumed":
                    bn.running_mean.copy_(mean0)
                    bn.running_var.copy_(var0)
                    bn.num_batches_tracked.fill_(3)
            res = {}
            with torch.no_grad():
                for i, x in enumerate(batches):
                    res[f"y/{i}"] = _numpy(bn(x.to(dtype)))
                    res[f"running_mean/{i}"] = _numpy(bn.running_mean)
                    res[f"running_var/{i}"] = _numpy(bn.running_var)
                    res[f"num_batches_tracked/{i}"] = _numpy(bn.num_batches_tracked)
                bn.eval()
                res["y_eval"] = _numpy(bn(x_eval.to(dtype)))
            results[dtype] = res
        arrays.update(_split(results, f"{case}/"))
    return arrays


# ------------------------------------------------------------------ 2. update_bn


def _narrow_basic(dtype=torch.float32) -> nn.Module:
    block, layers, width = NETS["basic"]
    net = NarrowResNet(block, layers, NUM_CLASSES, width)
    net.load_state_dict(torch.load(DATA / "narrow_basic.pt"))
    return net.to(dtype)


def _pooled_inputs(net: nn.Module, batches: list) -> dict:
    """Every BatchNorm's input over all `batches` run in train mode (each batch
    normalised with its own statistics, as `update_bn` runs them), pooled: the mean
    and the biased and unbiased variance over all the examples and positions."""
    net = copy.deepcopy(net).train()
    seen: dict[str, list] = {}
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            seen[name] = []
            m.register_forward_hook(
                lambda m, i, o, name=name: seen[name].append(i[0].detach())
            )
    with torch.no_grad():
        for x in batches:
            net(x)
    out = {}
    for name, parts in seen.items():
        # (examples * positions, channels) over every batch
        flat = torch.cat([p.transpose(0, 1).flatten(1) for p in parts], 1)
        out[f"population/{name}.mean"] = _numpy(flat.mean(1))
        out[f"population/{name}.var"] = _numpy(flat.var(1, correction=0))
        out[f"population/{name}.var_unbiased"] = _numpy(flat.var(1, correction=1))
        out[f"population/{name}.count"] = np.int64(flat.shape[1])
    return out


UPDATE_BN_SIZES = (4, 4, 3)


def update_bn() -> dict:
    gen = torch.Generator().manual_seed(232)
    batches = [torch.randn(n, 3, 12, 12, generator=gen) for n in UPDATE_BN_SIZES]
    arrays = {f"x/{i}": _numpy(x) for i, x in enumerate(batches)}
    results = {}
    for dtype in DTYPES:
        net = _narrow_basic(dtype).eval()
        xs = [x.to(dtype) for x in batches]
        res = _pooled_inputs(net, xs)
        # A loader may yield (input, target) pairs: update_bn takes the first.
        loader = [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs]
        swa_utils.update_bn(loader, net)
        assert not net.training, "update_bn restores the mode"
        res.update({f"state/{k}": v for k, v in _bn_buffers(net).items()})
        with torch.no_grad():
            res["eval_logits"] = _numpy(net(xs[0]))
        results[dtype] = res
    arrays.update(_split(results, ""))
    return arrays


# --------------------------------------------------------------------- 3. frozen


def _freeze(net: nn.Module) -> nn.Module:
    """Every `nn.BatchNorm2d` replaced by a `FrozenBatchNorm2d` loaded from its
    state_dict (as timm's `freeze_batch_norm_2d` does)."""
    for name, child in net.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = torchvision.ops.FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.to(child.weight.dtype)
            frozen.load_state_dict(child.state_dict())  # drops num_batches_tracked
            setattr(net, name, frozen)
        else:
            _freeze(child)
    return net


def frozen() -> dict:
    gen = torch.Generator().manual_seed(233)
    x = torch.randn(4, 3, 12, 12, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=gen)
    arrays = {"x": _numpy(x), "labels": _numpy(labels).astype(np.int32)}
    results = {}
    for dtype in DTYPES:
        res = {}
        plain = _narrow_basic(dtype).eval()
        plain.zero_grad()
        logits = plain(x.to(dtype))
        nn.functional.cross_entropy(logits, labels).backward()
        res["eval_logits"] = _numpy(logits)
        bn_params = {
            f"{name}.{p}"
            for name, m in plain.named_modules()
            if isinstance(m, nn.BatchNorm2d)
            for p in ("weight", "bias")
        }
        eval_grads = {}
        for name, p in plain.named_parameters():
            # The conv and fc gradients are the frozen network's (checked below).
            if name in bn_params:
                res[f"eval_grad/{name}"] = _numpy(p.grad)
            else:
                eval_grads[name] = p.grad

        net = _freeze(_narrow_basic(dtype)).train()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        logits = net(x.to(dtype))
        nn.functional.cross_entropy(logits, labels).backward()
        res["frozen_logits"] = _numpy(logits)
        for name, p in net.named_parameters():
            res[f"frozen_grad/{name}"] = _numpy(p.grad)
            if dtype == torch.float64:
                torch.testing.assert_close(p.grad, eval_grads[name])
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        opt.step()
        after = net.state_dict()
        for name, m in net.named_modules():
            if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
                for buf in ("weight", "bias", "running_mean", "running_var"):
                    key = f"{name}.{buf}"
                    assert torch.equal(before[key], after[key]), key
        with torch.no_grad():
            net.eval()
            eval_mode = net(x.to(dtype))
        assert torch.equal(eval_mode, net.train()(x.to(dtype))), "mode-independent"
        results[dtype] = res
    arrays.update(_split(results, ""))
    f32 = results[torch.float32]
    arrays["frozen_vs_eval_f32"] = np.float64(
        np.max(np.abs(f32["frozen_logits"] - f32["eval_logits"]))
    )
    return arrays


# ------------------------------------------------------------------ 4. averaging


class TinyNet(nn.Module):
    """conv-bn-relu twice, global average pool, linear: a 169-number state_dict."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


STEPS = 100
EMA_DECAY = 0.99
EMA_AT = (1, 2, 10, 50, 100)
SWA_START = 50  # SWA averages the weights after steps 51..100
RECALIBRATE = 4  # update_bn runs on the first 4 training batches


def _batches() -> tuple[np.ndarray, np.ndarray]:
    """The training data, not stored: NumPy's legacy `RandomState`, whose streams
    NumPy keeps fixed across versions (NEP 19), remakes it anywhere."""
    rng = np.random.RandomState(2324)
    xs = rng.standard_normal((STEPS, 8, 2, 6, 6)).astype(np.float32)
    labels = rng.randint(0, 2, (STEPS, 8)).astype(np.int64)
    return xs, labels


def _trajectory(net: TinyNet) -> list[dict]:
    xs, labels = _batches()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    states = [copy.deepcopy(net.state_dict())]
    for x, y in zip(xs, labels):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(
            net(torch.from_numpy(x)), torch.from_numpy(y)
        )
        loss.backward()
        opt.step()
        states.append(copy.deepcopy(net.state_dict()))
    return states


def _carrier(state: dict, dtype) -> TinyNet:
    net = TinyNet()
    net.load_state_dict(state)
    return net.to(dtype)


def _averaged_state(avg: swa_utils.AveragedModel) -> dict:
    return {k: _numpy(v) for k, v in avg.module.state_dict().items()}


def averaging() -> dict:
    gen = torch.Generator().manual_seed(234)
    torch.manual_seed(7)
    net = TinyNet()
    with torch.no_grad():
        for m in (net.bn1, net.bn2):
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.uniform_(-0.3, 0.3, generator=gen)
    live = swa_utils.AveragedModel(
        net, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(EMA_DECAY), use_buffers=True
    )
    states = _trajectory(net)
    arrays = {
        f"trajectory/{k}": np.stack([_numpy(s[k]) for s in states]) for k in states[0]
    }
    xs, _ = _batches()
    x_eval = torch.randn(5, 2, 6, 6, generator=gen)
    arrays["x_eval"] = _numpy(x_eval)
    results = {}
    for dtype in DTYPES:
        res = {}
        ema = swa_utils.AveragedModel(
            _carrier(states[0], dtype),
            multi_avg_fn=swa_utils.get_ema_multi_avg_fn(EMA_DECAY),
            use_buffers=True,
        )
        swa = swa_utils.AveragedModel(_carrier(states[0], dtype))
        for step in range(1, STEPS + 1):
            model = _carrier(states[step], dtype)
            ema.update_parameters(model)
            if dtype == torch.float32:
                live.update_parameters(model)  # as a training loop would call it
            if step in EMA_AT:
                for k, v in _averaged_state(ema).items():
                    res[f"ema/{step}/{k}"] = v
                res[f"ema/{step}/n_averaged"] = _numpy(ema.n_averaged)
            if step > SWA_START:
                swa.update_parameters(model)
        res["swa/n_averaged"] = _numpy(swa.n_averaged)
        for k, v in _averaged_state(swa).items():
            res[f"swa/averaged/{k}"] = v
        loader = [torch.from_numpy(x).to(dtype) for x in xs[:RECALIBRATE]]
        for name, avg in (("swa", swa), ("ema_update_bn", ema)):
            swa_utils.update_bn(loader, avg)
            for k, v in _bn_buffers(avg.module).items():  # the parameters stay
                res[f"{name}/recalibrated/{k}"] = v
            with torch.no_grad():
                res[f"{name}/eval_logits"] = _numpy(avg.eval()(x_eval.to(dtype)))
        results[dtype] = res
    for k, v in live.module.state_dict().items():
        ref = torch.from_numpy(results[torch.float32][f"ema/100/{k}"])
        assert torch.equal(v, ref), (k, v, ref)
    arrays.update(_split(results, ""))
    return arrays


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for name, make in (
        ("cma", cma),
        ("update_bn", update_bn),
        ("frozen", frozen),
        ("averaging", averaging),
    ):
        np.savez_compressed(DATA / f"{name}.npz", **make())
        path = DATA / f"{name}.npz"
        print(f"{path.name}: {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()

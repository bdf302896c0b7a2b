"""A ResNet-18 training step (forward, cross-entropy, backward) with ``hierfast.nn.fuse``
against eager PyTorch, eager with torch's own Conv+BN folding, and torch.compile: the
model-level workload of the issue "Fused conv-activation layers: hierfast.nn".

Workload: torchvision's ResNet-18 architecture (ImageNet: 7x7/2 stem, max-pool, BasicBlocks
2-2-2-2 with 64/128/256/512 channels, average pool, 1000-way fc), written here (torchvision is
not a dependency), fine-tuned with *frozen* BatchNorm (``bn.eval()``, BN parameters not
trained: the FrozenBatchNorm2d convention of detection and segmentation fine-tuning). Frozen BN
is what lets ``fuse`` fold BN and fuse the activation in training; with batch-statistics BN there
is no Conv -> activation edge to fuse. 224x224 inputs; N = 8 on the CPU (fp32, channels_last),
N = 64 on a GPU (bf16, channels_last); ``--quick``: N = 2 (CPU) / 16 (GPU) at 112x112.

Providers (same weights, timed round-robin like bench_conv):
- eager: the frozen-BN model as written;
- eager, BN folded by torch: ``torch.fx.experimental.optimization.fuse`` (Conv+BN -> Conv in
  eval mode), then trained; the best plain-torch alternative without a compiler;
- torch.compile: the frozen-BN model, default mode (compile time in the note);
- hierfast fuse: ``hierfast.nn.fuse(model)``: Conv+BN(+ReLU) -> ``Conv2dAct``.

Accuracy: the logits and the fc layer's weight gradient (not folded, so the same parameter in
every provider) against the eager model in float64; the column shows the larger relative error.
Target (issue, GPU): hierfast fuse >= 1.1x eager.

Run: ``python benchmarks/run.py resnet_step [--quick]``.
"""
from __future__ import annotations

import copy
import math
import os
import time

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # as bench_conv: no background compile workers

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _common import row  # noqa: E402
from bench_capture import BasicBlock  # noqa: E402  (conv-bn-relu, conv-bn, + shortcut, relu)
from bench_conv import _interleaved  # noqa: E402


class ResNet18(nn.Module):
    """torchvision.models.resnet18's layers and forward (He et al. 2016)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def frozen_bn_resnet18(seed: int = 0) -> ResNet18:
    """Random weights with non-trivial BN statistics, BatchNorm frozen (eval, no grads)."""
    torch.manual_seed(seed)
    m = ResNet18()
    for bn in (mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)):
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.1)
    return freeze_bn(m.train())


def freeze_bn(model: nn.Module) -> nn.Module:
    for bn in (mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)):
        bn.eval()
        bn.requires_grad_(False)
    return model


def torch_folded(model: nn.Module) -> nn.Module:
    """Conv+BN folded by torch's own fx pass (needs eval mode), then back to training."""
    from torch.fx.experimental.optimization import fuse as torch_fuse

    return torch_fuse(copy.deepcopy(model).eval()).train()


def _fc_weight(model: nn.Module) -> nn.Parameter:
    return dict(model.named_parameters())["fc.weight"]


def _step(model, x, target, fc_weight):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.grad = None
        logits = model(x)
        F.cross_entropy(logits.float(), target).backward()
        return logits.detach(), fc_weight.grad
    return run


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max()).item()


def run(quick: bool = False) -> list[dict]:
    from hierfast.nn import fuse

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    n = (16 if cuda else 2) if quick else (64 if cuda else 8)
    size = 112 if quick else 224
    base = frozen_bn_resnet18(0)
    torch.manual_seed(1)
    x = torch.randn(n, 3, size, size).to(device, dtype).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (n,), device=device)

    ref = copy.deepcopy(base).double().to(device)  # the float64 oracle (frozen-BN eager)
    ref_logits = ref(x.double())
    F.cross_entropy(ref_logits, target).backward()
    ref_gfc = _fc_weight(ref).grad

    def prepared(m):
        return m.to(device, dtype).to(memory_format=torch.channels_last)

    eager = prepared(copy.deepcopy(base))
    folded = prepared(torch_folded(base))
    fused, report = fuse(base)
    fused = prepared(fused)
    n_fused = sum(r["fused"] for r in report)
    torch._dynamo.reset()
    compiled_src = prepared(copy.deepcopy(base))
    compiled = torch.compile(compiled_src)
    t0 = time.perf_counter()
    _step(compiled, x, target, _fc_weight(compiled_src))()  # compile fwd + bwd before timing
    compile_s = time.perf_counter() - t0

    fns = {"eager (frozen BN)": _step(eager, x, target, _fc_weight(eager)),
           "eager, BN folded by torch": _step(folded, x, target, _fc_weight(folded)),
           "torch.compile": _step(compiled, x, target, _fc_weight(compiled_src)),
           "hierfast fuse": _step(fused, x, target, _fc_weight(fused))}
    notes = {"torch.compile": f"compile {compile_s:.0f} s (first step)",
             "hierfast fuse": f"{n_fused} convs fused ({len(report)} candidates)"}
    with torch.enable_grad():
        res = _interleaved(fns, budget_s=3.0 if quick else 15.0, min_repeats=3, max_repeats=8 if quick else 20,
                           device=device)
    wl = f"ResNet-18 training step, frozen BN, {size}x{size} (N={n}, {str(dtype).replace('torch.', '')})"
    flops = 3 * n * 1.814e9 * (size / 224) ** 2  # forward ~1.81 GFLOP per 224^2 image; backward ~2x
    base_t = res["eager (frozen BN)"]["median"]
    rows = []
    for prov, t in res.items():
        logits, gfc = t["result"]
        dev = max(_rel(logits, ref_logits), _rel(gfc, ref_gfc))
        rows.append(row(wl, prov, t, ratio=base_t / t["median"], max_dev=dev, note=notes.get(prov, ""),
                        gflops=flops / t["median"] / 1e9))
    return rows


def summary(rows) -> list[str]:
    by = {r["provider"]: r for r in rows}
    hf = by.get("hierfast fuse")
    if hf is None:
        return []
    best = max((r for r in rows if r["provider"] != "hierfast fuse"), key=lambda r: r["ratio"])
    out = [f"hierfast fuse vs eager: {hf['ratio']:.2f}x (target on a GPU >= 1.1x: "
           f"{'MET' if hf['ratio'] >= 1.1 else 'MISSED'}{'' if torch.cuda.is_available() else '; this run is on the CPU'})",
           f"hierfast fuse vs the best other provider ({best['provider']}): {hf['ratio'] / best['ratio']:.2f}x"]
    devs = [r["max_dev"] for r in rows if math.isfinite(r["max_dev"])]
    if devs:
        out.append(f"max relative deviation from float64 (logits, fc weight grad): {max(devs):.1e}")
    return out

"""hierfast.nn: Conv2dAct (nn.Conv2d compatibility), fuse (Sequential and fx, BN folding), stats taps."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hierfast
from hierfast.nn import Conv2dAct, fuse, layer_stats, reset_stats, track_stats


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            if m.affine:
                m.weight.data.normal_()
                m.bias.data.normal_()
    return model


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, "same", (2, 1)])
def test_conv2dact_equals_conv_plus_activation(padding_mode, padding):
    torch.manual_seed(0)
    m = Conv2dAct(4, 6, 3, padding=padding, padding_mode=padding_mode, activation="leaky_relu",
                  negative_slope=0.1, dtype=torch.float64)
    ref = nn.Conv2d(4, 6, 3, padding=padding, padding_mode=padding_mode, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    torch.testing.assert_close(m(x), F.leaky_relu(ref(x), 0.1))
    torch.testing.assert_close(m(x[0]), F.leaky_relu(ref(x[0]), 0.1))  # unbatched


def test_state_dict_round_trip_and_repr():
    conv = nn.Conv2d(3, 5, 3, stride=2, bias=False)
    m = Conv2dAct(3, 5, 3, stride=2, bias=False, activation="gelu", approximate="tanh")
    assert list(m.state_dict()) == list(conv.state_dict()) == ["weight"]
    m.load_state_dict(conv.state_dict())
    assert torch.equal(m.weight, conv.weight)
    conv.load_state_dict(Conv2dAct(3, 5, 3, stride=2, bias=False).state_dict())
    assert "activation=gelu(approximate='tanh')" in repr(m)
    assert isinstance(m, nn.Conv2d)
    with pytest.raises(ValueError, match="unknown activation"):
        Conv2dAct(3, 5, 3, activation="swish2")


def test_training_step_matches_eager():
    torch.manual_seed(0)
    m = Conv2dAct(4, 6, 3, padding=1, activation="silu")
    ref = nn.Conv2d(4, 6, 3, padding=1)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(3, 4, 8, 8).to(memory_format=torch.channels_last)
    m(x).square().mean().backward()
    F.silu(ref(x)).square().mean().backward()
    for a, b in ((m.weight, ref.weight), (m.bias, ref.bias)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def _seq_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8), nn.BatchNorm2d(8, affine=False), nn.ReLU6(),
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16),  # conv + BN, no activation
        nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.GELU(approximate="tanh")),
        nn.Conv2d(16, 4, 3), nn.Hardswish(), nn.Conv2d(4, 4, 1), nn.Mish(), nn.Conv2d(4, 4, 1), nn.Tanh(),
        nn.Conv2d(4, 4, 1), nn.Sigmoid(), nn.Conv2d(4, 4, 1), nn.SiLU(), nn.Conv2d(4, 4, 1), nn.LeakyReLU(0.3),
        nn.Conv2d(4, 2, 1),  # lone conv: left alone
    )


def test_fuse_sequential_equals_original():
    torch.manual_seed(0)
    model = _randomise_bn(_seq_model()).eval()
    fused, report = fuse(model)
    assert fused is not model and type(model[0]) is nn.Conv2d  # not in place
    done = [r for r in report if r["fused"]]
    assert len(done) == 10 and sum(r["batchnorm"] for r in done) == 3
    assert sum(isinstance(m, Conv2dAct) for m in fused.modules()) == 10
    assert type(fused[-1]) is nn.Conv2d
    x = torch.randn(2, 3, 17, 15)
    assert _rel(fused(x), model(x)) <= 1e-5


def test_fuse_inplace_and_training_bn_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
    out, report = fuse(model, inplace=True)  # BN in training mode
    assert out is model
    assert not report[0]["fused"] and "training mode" in report[0]["reason"]
    assert report[1]["fused"] and isinstance(model[3], Conv2dAct)


class _Block(nn.Module):
    """Not a Sequential: residual block with functional activations."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = F.relu(self.bn1(self.c1(x)))
        h = F.gelu(self.c2(h)) + x
        z = self.c3(h)
        return z.sigmoid() + z  # c3's output has two users: must not be fused


def test_fuse_fx_graph():
    torch.manual_seed(0)
    model = _randomise_bn(_Block()).eval()
    fused, report = fuse(model)
    assert isinstance(fused, torch.fx.GraphModule)
    fx_done = {r["layer"]: r for r in report if r["fused"]}
    assert set(fx_done) == {"c1", "c2"} and fx_done["c1"]["batchnorm"]
    assert type(fused.c3) is nn.Conv2d
    x = torch.randn(2, 4, 9, 9)
    assert _rel(fused(x), model(x)) <= 1e-5


def test_fuse_untraceable_model_reports_and_keeps_sequentials():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            h = self.body(x)
            if h.sum() > 0:  # data-dependent control flow: fx cannot trace
                h = self.head(h)
            return h

    fused, report = fuse(Dyn().eval())
    assert isinstance(fused.body[0], Conv2dAct)
    assert any(not r["fused"] and "torch.fx could not trace" in r["reason"] for r in report)


def test_fused_model_compiles_fullgraph():
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
                                        nn.Conv2d(8, 8, 3, groups=8), nn.ReLU())).eval()
    fused, _ = fuse(model)
    x = torch.randn(2, 3, 10, 10)
    torch._dynamo.reset()
    with torch.no_grad():
        assert _rel(torch.compile(fused, fullgraph=True)(x), model(x)) <= 1e-5


def test_track_stats():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, stride=2), nn.GELU())
    fused, _ = fuse(model)
    assert track_stats(fused) == ["0", "2"]
    xs = [torch.randn(2, 3, 9, 9), torch.randn(3, 3, 9, 9).to(memory_format=torch.channels_last)]
    for x in xs:
        fused(x)
    stats = layer_stats(fused)
    for name, upto in (("0", 2), ("2", 4)):
        ys = torch.cat([model[:upto](x).detach().double().transpose(0, 1).reshape(model[upto - 2].out_channels, -1)
                        for x in xs], 1)
        s = stats[name]
        assert s["count"] == ys.shape[1]
        torch.testing.assert_close(s["mean"], ys.mean(1), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s["var"], ys.var(1, unbiased=False), atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(s["frac_active"], (ys > 0).double().mean(1))
    reset_stats(fused)
    assert layer_stats(fused) == {}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_track_stats_from_inference_mode_on(backend, monkeypatch):
    """The first tracked call under inference_mode must not leave an inference tensor behind:
    later calls outside it add to the same sums."""
    monkeypatch.setenv("HIERFAST_BACKEND", backend)
    torch.manual_seed(0)
    m = Conv2dAct(3, 4, 3, track_stats=True, activation="gelu")
    xs = [torch.randn(2, 3, 6, 6) for _ in range(3)]
    with torch.inference_mode():
        m(xs[0])
    with torch.no_grad():
        m(xs[1])
    m(xs[2].requires_grad_())
    ref = nn.Conv2d(3, 4, 3)
    ref.load_state_dict(m.state_dict())
    ys = torch.cat([F.gelu(ref(x)).detach().double().transpose(0, 1).reshape(4, -1) for x in xs], 1)
    s = m.stats()
    assert s["count"] == ys.shape[1]
    torch.testing.assert_close(s["mean"], ys.mean(1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s["var"], ys.var(1, unbiased=False), atol=1e-6, rtol=1e-4)


def test_track_stats_survive_a_meta_pass():
    """A shape-only pass on meta tensors adds nothing and loses nothing of the sums."""
    torch.manual_seed(0)
    m = Conv2dAct(3, 4, 3, track_stats=True)
    x = torch.randn(2, 3, 6, 6)
    m(x)
    before = m.stats()
    Conv2dAct.forward(m.to("meta"), torch.empty(2, 3, 6, 6, device="meta"))
    s = m.stats()
    assert s["count"] == before["count"] and s["mean"].device.type == "cpu"
    torch.testing.assert_close(s["mean"], before["mean"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_track_stats_move_with_the_input():
    """Input moved to another device: the sums move with it, consistent with the count."""
    torch.manual_seed(0)
    m = Conv2dAct(3, 4, 3, track_stats=True)
    ref = nn.Conv2d(3, 4, 3)
    ref.load_state_dict(m.state_dict())
    xs = [torch.randn(2, 3, 6, 6) for _ in range(2)]
    m(xs[0])
    m.cuda()(xs[1].cuda())
    ys = torch.cat([F.relu(ref(x)).detach().double().transpose(0, 1).reshape(4, -1) for x in xs], 1)
    s = m.stats()
    assert s["count"] == ys.shape[1]
    torch.testing.assert_close(s["mean"].cpu(), ys.mean(1), atol=1e-6, rtol=1e-5)


def test_lazy_package_attributes():
    assert hierfast.nn.Conv2dAct is Conv2dAct
    assert callable(hierfast.functional.conv2d_act)


def test_autocast_runs_in_autocast_dtype_like_conv2d():
    torch.manual_seed(0)
    m = Conv2dAct(4, 6, 3, padding=1, activation="silu")
    ref = nn.Conv2d(4, 6, 3, padding=1)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, r = m(x), F.silu(ref(x))
    assert y.dtype == r.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), r.float(), atol=3e-2, rtol=2e-2)
    m, ref, x = m.double(), ref.double(), x.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # float64 is not autocast's to cast
        y, r = m(x), F.silu(ref(x))
    assert y.dtype == r.dtype == torch.float64
    torch.testing.assert_close(y, r)


def test_meta_tensors_give_conv2ds_output():
    """Meta tensors (shape inference, deferred initialisation) give nn.Conv2d's shape, dtype
    and device, with and without a statistics tap, in inference and training."""
    ref = nn.Conv2d(3, 4, 3, stride=2, device="meta")
    for track in (False, True):
        m = Conv2dAct(3, 4, 3, stride=2, device="meta", track_stats=track)
        for x in (torch.empty(2, 3, 9, 8, device="meta"), torch.empty(3, 9, 8, device="meta")):
            y, r = m(x), ref(x)
            assert (y.shape, y.dtype, y.device) == (r.shape, r.dtype, r.device)
            with torch.no_grad():
                assert m(x).shape == r.shape


class _SharedConv(nn.Module):
    """One conv module called at two places of forward."""

    def __init__(self, second):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)
        self.second = second

    def forward(self, x):
        return F.relu(self.c(x)) + self.second(self.c(x))


@pytest.mark.parametrize("second", [nn.Identity(), nn.Sigmoid()], ids=["plain", "sigmoid"])
def test_fuse_leaves_a_conv_called_twice_alone(second):
    torch.manual_seed(0)
    model = _SharedConv(second).eval()
    fused, report = fuse(model)
    assert report == [{"layer": "c", "fused": False, "reason": report[0]["reason"]}]
    assert "called at 2 places" in report[0]["reason"]
    x = torch.randn(2, 3, 8, 8)
    c = model.c
    torch.testing.assert_close(fused(x), F.relu(F.conv2d(x, c.weight, c.bias, padding=1))
                               + second(F.conv2d(x, c.weight, c.bias, padding=1)))


def test_fuse_leaves_a_batchnorm_called_twice_alone():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.bn(self.c1(x))) + self.bn(self.c2(x))

    torch.manual_seed(0)
    model = _randomise_bn(M()).eval()
    fused, report = fuse(model)
    assert [(r["layer"], r["fused"]) for r in report] == [("c1", False), ("c2", False)]
    assert all("'bn' is called at 2 places" in r["reason"] for r in report)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fused(x), model(x))


@pytest.mark.parametrize("batchnorm", [False, True], ids=["conv", "conv_bn"])
def test_fuse_keeps_frozen_layers_frozen(batchnorm):
    for frozen in (False, True):
        layers = [nn.Conv2d(3, 4, 3, bias=not batchnorm)] + ([nn.BatchNorm2d(4)] if batchnorm else []) + [nn.ReLU()]
        model = nn.Sequential(*layers, nn.Conv2d(4, 4, 1), nn.ReLU()).eval()
        model[0].requires_grad_(not frozen)
        fused, report = fuse(model)
        assert all(r["fused"] for r in report) and len(report) == 2
        assert [p.requires_grad for p in fused[0].parameters()] == [not frozen] * 2
        assert all(p.requires_grad for p in fused[len(layers)].parameters())
        copied = Conv2dAct.from_conv(model[0])
        assert [p.requires_grad for p in copied.parameters()] == [p.requires_grad for p in model[0].parameters()]


def test_fuse_keeps_shared_weights_tied_and_the_optimizers_parameters():
    """Without BN the fused layer holds the conv's own Parameters: a conv at two places stays
    tied, and an optimizer built before fuse(inplace=True) still trains the model."""
    torch.manual_seed(0)
    c = nn.Conv2d(4, 4, 3, padding=1)
    two_sequentials = nn.Sequential(nn.Sequential(c, nn.ReLU()), nn.Sequential(c, nn.GELU()))
    for model in (nn.Sequential(c, nn.ReLU(), c), two_sequentials):
        ref = [p.detach().clone() for p in c.parameters()]
        fused, report = fuse(model)
        x = torch.randn(2, 4, 6, 6)
        torch.testing.assert_close(fused(x), model(x))
        w = [m.weight for m in fused.modules() if isinstance(m, nn.Conv2d)]
        assert len(w) == 2 and w[0] is w[1]
        assert all(torch.equal(a, b) for a, b in zip(c.parameters(), ref))  # a copy: c is unchanged
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fused, _ = fuse(model, inplace=True)
    before = fused[0].weight.detach().clone()
    fused(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    assert not torch.equal(fused[0].weight, before)


def test_fuse_does_not_fold_bn_into_tied_weights():
    """Folding a BN makes new weights: where the conv's parameters are shared (one module at two
    places, or tied by hand), the fold is refused and reported, and the ties hold."""
    torch.manual_seed(0)
    c, d = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    d.weight = c.weight
    for model, layer in ((nn.Sequential(c, nn.BatchNorm2d(4), nn.ReLU(), c), "0"),
                         (nn.Sequential(c, nn.ReLU(), d, nn.BatchNorm2d(4), nn.ReLU()), "2")):
        model = _randomise_bn(model).eval()
        fused, report = fuse(model)
        refused = [r for r in report if not r["fused"]]
        assert [r["layer"] for r in refused] == [layer] and "shared with another layer" in refused[0]["reason"]
        w = [m.weight for _, m in fused.named_modules(remove_duplicate=False) if isinstance(m, nn.Conv2d)]
        assert len(w) == 2 and w[0] is w[1]
        x = torch.randn(2, 4, 6, 6)
        torch.testing.assert_close(fused(x), model(x))


class _TwoAliases(nn.Module):
    def __init__(self, blk):
        super().__init__()
        self.a = self.b = blk

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("shape", ["sequential", "aliases"])
def test_fuse_folds_bn_inside_a_reused_block(shape):
    """A block used twice (``nn.Sequential(blk, blk)``, ``self.a = self.b = blk``) holds its conv
    in one slot: one fold inside it is exact for both uses, so it is not refused as shared."""
    torch.manual_seed(0)
    blk = _randomise_bn(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    model = (nn.Sequential(blk, blk) if shape == "sequential" else _TwoAliases(blk)).eval()
    fused, report = fuse(model)
    assert [r["fused"] for r in report] == [True] and report[0]["batchnorm"]
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    ref = model.double()(x)
    torch.testing.assert_close(fused.double()(x), ref)


class _ConvBnRelu(nn.Module):
    def __init__(self, bn):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 4, 3, padding=1), bn

    def forward(self, x):
        return F.relu(self.bn(self.c(x)))


@pytest.mark.parametrize("bn,reason", [
    (nn.BatchNorm2d(4), "training mode"),
    (nn.BatchNorm2d(4, track_running_stats=False).eval(), "no running statistics"),
    (nn.SyncBatchNorm(4).eval(), "not a BatchNorm2d"),
], ids=["training", "no_running_stats", "sync"])
def test_fuse_fx_reports_refused_batchnorm(bn, reason):
    model = _ConvBnRelu(bn)
    fused, report = fuse(model)
    assert [(r["layer"], r["fused"]) for r in report] == [("c", False)] and reason in report[0]["reason"]
    assert type(fused.c) is nn.Conv2d


def test_fuse_fx_folds_a_bn_whose_output_has_other_users():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            z = self.bn(self.c(x))
            return z.relu() + z

    torch.manual_seed(0)
    model = _randomise_bn(M()).eval()
    fused, report = fuse(model)
    assert report[0]["fused"] and report[0]["batchnorm"] and report[0]["activation"] == "identity"
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fused(x), model(x), atol=1e-5, rtol=1e-5)


def test_fuse_keeps_numpy_integer_arguments_working():
    np = pytest.importorskip("numpy")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=np.int64(2), padding=np.int64(1)), nn.ReLU()).eval()
    fused, report = fuse(model)
    assert report[0]["fused"]
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(fused(x), model(x))


def test_fuse_keeps_channels_last_weights():
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()).to(memory_format=torch.channels_last)
    fused, _ = fuse(model)
    assert fused[0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 8, 9, 9).to(memory_format=torch.channels_last)
    torch.testing.assert_close(fused(x), model(x))


class _TorchvisionBasicBlock(nn.Module):
    """torchvision's BasicBlock: the residual added in place to the second conv's BN output."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fuse_blocks_inside_a_sequential_and_train(channels_last):
    """torchvision's BasicBlocks in an nn.Sequential (the `nn.Sequential(*resnet.children())`
    feature-extractor idiom: the blocks are fused by tracing each one; a Sequential model was
    once left unfused) train like the unfused blocks with frozen BN: outputs, input and weight
    gradients."""
    torch.manual_seed(0)
    model = _randomise_bn(nn.Sequential(_TorchvisionBasicBlock(8), _TorchvisionBasicBlock(8))).eval()
    fused, report = fuse(model)
    assert sum(r["fused"] for r in report) == 4
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=fmt)
    outs, grads = [], []
    for m in (model, fused):  # frozen BN (eval mode), trained like a fine-tuned backbone
        xi = x.detach().clone().requires_grad_()
        y = m(xi)
        y.square().mean().backward()
        outs.append(y.detach())
        grads.append(xi.grad)
    assert _rel(outs[1], outs[0]) <= 1e-5 and _rel(grads[1], grads[0]) <= 1e-4
    # folded weights w' = w * s (s = gamma / sqrt(var + eps)): dL/dw = dL/dw' * s
    bn = model[1].bn2
    s = (bn.weight / (bn.running_var + bn.eps).sqrt())[:, None, None, None]
    assert _rel(fused[1].conv2.weight.grad * s, model[1].conv2.weight.grad) <= 1e-4


@pytest.mark.parametrize("activation", ["identity", "gelu", "mish"])
def test_output_changed_in_place_trains_like_conv(activation):
    """A layer whose backward needs nothing of its output (identity) or keeps the pre-activation
    (smooth activations) lets the caller change the output in place, as after nn.Conv2d + that
    activation (a residual `out += x`; the identity layer once raised "modified by an inplace
    operation"). The ReLU family keeps y, as torch's ReLU does: there both raise alike."""
    torch.manual_seed(0)
    m = Conv2dAct(6, 6, 3, padding=1, activation=activation)
    ref = nn.Conv2d(6, 6, 3, padding=1)
    ref.load_state_dict(m.state_dict())
    act = {"identity": nn.Identity(), "gelu": nn.GELU(), "mish": nn.Mish()}[activation]
    x = torch.randn(2, 6, 9, 9)
    for layer in (m, lambda t: act(ref(t))):
        out = layer(x)
        out += x
        out.square().sum().backward()
    for a, b in ((m.weight, ref.weight), (m.bias, ref.bias)):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
def test_torch_func_transforms(activation):
    """Per-sample gradients (vmap over grad, torch.func.functional_call) and a Jacobian (jacrev)
    as with nn.Conv2d + the activation; the statistics tap is skipped under the transforms (the
    fused op's autograd Function once refused them)."""
    from torch.func import functional_call, grad, jacrev, vmap

    torch.manual_seed(0)
    m = Conv2dAct(3, 4, 3, padding=1, activation=activation, track_stats=True)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict(m.state_dict())
    act = {"relu": F.relu, "gelu": F.gelu, "identity": lambda t: t}[activation]
    params = {k: v.detach() for k, v in m.named_parameters()}
    x = torch.randn(5, 3, 8, 8)

    def per_sample(model, post):
        def loss(p, xi):
            return post(functional_call(model, p, (xi.unsqueeze(0),))).square().mean()
        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    ours, theirs = per_sample(m, lambda y: y), per_sample(ref, act)
    for k in ours:
        assert ours[k].shape == (5, *params[k].shape)
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=1e-5)
    jac = jacrev(lambda xi: m(xi))(x[:1])
    torch.testing.assert_close(jac, jacrev(lambda xi: act(ref(xi)))(x[:1]), atol=1e-5, rtol=1e-5)
    assert m.stats() is None  # nothing tapped under the transforms
    m(x)
    assert m.stats()["count"] == 5 * 8 * 8  # eager calls still are


def test_fuse_leaves_hooked_layers_alone():
    """A conv, BN or activation with hooks or parametrizations (a capture's forward hook, a pruning
    mask, weight norm) is not fused: the fused layer would drop them silently. The report says
    why; the other layers still fuse, and the model computes what it did."""
    from torch.nn.utils import parametrizations, prune

    torch.manual_seed(0)
    seen = []
    model = _randomise_bn(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),   # 0: BN hooked
        nn.Conv2d(4, 4, 3, padding=1), nn.GELU(),                      # 3: pruned (a pre-hook)
        nn.Conv2d(4, 4, 1), nn.SiLU(),                                 # 5: weight norm (parametrized)
        nn.Conv2d(4, 4, 1), nn.ReLU(),                                 # 7: activation hooked
        nn.Conv2d(4, 4, 1), nn.Tanh())).eval()                         # 9: plain: fused
    model[1].register_forward_hook(lambda m, i, o: seen.append("bn"))
    prune.l1_unstructured(model[3], "weight", amount=0.5)
    parametrizations.weight_norm(model[5])
    model[8].register_forward_hook(lambda m, i, o: seen.append("relu"))
    x = torch.randn(2, 3, 8, 8)
    want = model(x)
    with pytest.raises(ValueError, match="inplace=True"):  # torch cannot deep-copy a pruned module
        fuse(model)
    fused, report = fuse(model, inplace=True)
    by_layer = {r["layer"]: r for r in report}
    assert [k for k, r in by_layer.items() if r["fused"]] == ["9"]
    assert "forward hooks" in by_layer["0"]["reason"] and "BatchNorm2d" in by_layer["0"]["reason"]
    assert "forward pre-hooks" in by_layer["3"]["reason"]
    assert "parametrizations" in by_layer["5"]["reason"]
    assert "ReLU" in by_layer["7"]["reason"]
    seen.clear()
    assert _rel(fused(x), want) <= 1e-5 and seen == ["bn", "relu"]


@pytest.mark.parametrize("activation", ["relu", "gelu", "mish"])
def test_jit_trace_records_the_layer(activation):
    """torch.jit.trace (TorchScript deployment) records torch's conv and activation: the traced
    module computes what the layer does on new inputs (it once failed on oneDNN's arguments)."""
    import warnings

    torch.manual_seed(0)
    m = Conv2dAct(3, 8, 3, padding=1, activation=activation, track_stats=True).eval()
    x = torch.randn(2, 3, 40, 40).to(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        traced = torch.jit.trace(m, x, check_trace=False)  # (the check would run m eagerly: tapped)
    assert m.stats() is None  # the tap is skipped while tracing
    x2 = torch.randn(3, 3, 40, 40)
    torch.testing.assert_close(traced(x2), m(x2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_runs_in_onnxruntime(dynamo):
    """Both ONNX exporters translate a fused model (torch's conv and activation are recorded; the
    dynamo exporter has no translation of the custom op) and onnxruntime computes what it does."""
    import io
    import warnings

    ort = pytest.importorskip("onnxruntime")  # in the test extras; here for installs without them
    pytest.importorskip("onnxscript" if dynamo else "onnx")
    torch.manual_seed(0)
    model, _ = fuse(_randomise_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(),
                                                nn.Conv2d(8, 8, 3, groups=8, padding=1), nn.ReLU6())).eval())
    x = torch.randn(2, 3, 20, 20)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), f, dynamo=dynamo)
    sess = ort.InferenceSession(f.getvalue())
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model(x).detach(), atol=1e-5, rtol=1e-5)


def test_paused_stats_counts_nothing_inside_and_restores_flags():
    from hierfast.nn import paused_stats

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dAct(3, 4, 3, track_stats=True), Conv2dAct(4, 5, 3, activation="gelu"))
    seen, hidden = torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)
    model(seen)
    with paused_stats(model):
        assert [m.track_stats for m in model] == [False, False]
        model(hidden)
    with pytest.raises(RuntimeError, match="inside"), paused_stats(model):
        model(hidden)
        raise RuntimeError("inside")
    assert [m.track_stats for m in model] == [True, False]  # as before, also after the exception
    y = F.relu(F.conv2d(seen, model[0].weight, model[0].bias)).double().transpose(0, 1).flatten(1)
    s = model[0].stats()
    assert s["count"] == y.shape[1] and model[1].stats() is None
    torch.testing.assert_close(s["mean"], y.mean(1), atol=1e-6, rtol=1e-5)
    model(hidden)  # tracking resumes after the block
    assert model[0].stats()["count"] == y.shape[1] * 5 // 2
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"), paused_stats([model]):
        pass

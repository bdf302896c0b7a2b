"""hierfast.capture: LayerCapture and analyze() against explicit plain-torch forwards and the
float64 minibatch CKA reference (tests/capture_reference.py)."""
import math

import pytest
import torch
from torch import nn

import hierfast
from hierfast.capture import BatchContext, LayerCapture, Results, analyze, register_statistic
from capture_reference import minibatch_cka_matrix

TOL = 1e-5  # float32 features, float64 statistics


# -- models with explicit reference forwards ---------------------------------------------------
class InplaceCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        h = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.fc(h.flatten(1))

    @torch.no_grad()
    def reference(self, x):
        c1 = self.conv1(x)
        c2 = self.conv2(torch.relu(c1))
        fc = self.fc(torch.relu(c2).flatten(1))
        return [c1.flatten(1), c2.flatten(1), fc]


def _batches(n_batches, b, *shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *shape, generator=g) for _ in range(n_batches)]


def test_inplace_relu_cnn_matches_reference_and_naive_hooks_do_not():
    net = InplaceCNN()
    data = _batches(4, 16, 3, 8, 8)
    res = analyze(net, data, progress=False)
    assert res.layers == ["conv1", "conv2", "fc"]
    assert res.shapes == {"conv1": (8, 8, 8), "conv2": (16, 4, 4), "fc": (10,)}
    assert res.n_samples == 64 and res.n_batches == 4
    ref = minibatch_cka_matrix([net.reference(x) for x in data])
    assert res.cka.dtype == torch.float64 and res.cka.shape == (3, 3)
    torch.testing.assert_close(res.cka, ref, atol=TOL, rtol=0)
    # the trap the engine avoids: a hook that keeps the output object sees it overwritten by ReLU(inplace)
    naive, hooks = [], []
    for m in (net.conv1, net.conv2, net.fc):
        hooks.append(m.register_forward_hook(lambda mod, a, out: naive[-1].append(out.flatten(1))))
    with torch.no_grad():
        for x in data:
            naive.append([])
            net(x)
    for h in hooks:
        h.remove()
    assert (minibatch_cka_matrix(naive) - ref).abs().max() > 1e-3


def test_training_flag_restored_and_model_unchanged():
    net = InplaceCNN().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    analyze(net, _batches(2, 8, 3, 8, 8), progress=False)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not net._forward_hooks and not net.conv1._forward_hooks


@pytest.mark.parametrize("top,sub", [(True, False), (False, True)])
def test_mixed_submodule_flags_restored_also_on_errors(top, sub):
    """A frozen BatchNorm in a training model, MC-dropout in an eval one: each module's own
    flag comes back, for model and compare_to, after a run and after a failing run."""
    def make():
        m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))
        m.train(top)
        m[1].train(sub)
        m[2].train(sub)
        return m

    a, b = make(), make()
    expected = [top, top, sub, sub, top]  # Sequential, Linear, BatchNorm1d, Dropout, Linear
    analyze(a, [torch.randn(8, 4)] * 2, compare_to=b, progress=False)
    assert [m.training for m in a.modules()] == expected and [m.training for m in b.modules()] == expected
    with pytest.raises(RuntimeError):
        analyze(a, [torch.randn(8, 5)], compare_to=b, progress=False)  # wrong input width: the forward fails
    assert [m.training for m in a.modules()] == expected and [m.training for m in b.modules()] == expected


class RNNStack(nn.Module):
    """LSTM (time-major, batch_first=False) -> GRU (batch_first) -> linear head on the last step."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(5, 12, num_layers=2)
        self.gru = nn.GRU(12, 7, batch_first=True)
        self.head = nn.Linear(7, 3)

    def forward(self, x):  # x: (N, T, 5)
        h, _ = self.lstm(x.transpose(0, 1))
        g, _ = self.gru(h.transpose(0, 1))
        return self.head(g[:, -1])

    @torch.no_grad()
    def reference(self, x):
        h, (hn, cn) = self.lstm(x.transpose(0, 1))
        g, _ = self.gru(h.transpose(0, 1))
        return [h.transpose(0, 1).flatten(1), g.flatten(1), self.head(g[:, -1])]


def test_lstm_gru_stack():
    net = RNNStack()
    data = [(x, torch.randint(0, 3, (x.shape[0],))) for x in _batches(3, 12, 6, 5)]
    res = analyze(net, data, progress=False)
    assert res.layers == ["lstm", "gru", "head"]
    assert res.shapes["lstm"] == (6, 12)  # (T, H) per sample: the time-major output was transposed
    ref = minibatch_cka_matrix([net.reference(x) for x, _ in data])
    torch.testing.assert_close(res.cka, ref, atol=TOL, rtol=0)


def test_lstm_output_fn_picks_final_hidden_state():
    net = RNNStack()
    data = _batches(3, 10, 4, 5)
    res = analyze(net, data, layers=["lstm"], output_fn=lambda out: out[1][0][-1], progress=False)
    ref_feats = []
    with torch.no_grad():
        for x in data:
            _, (hn, _) = net.lstm(x.transpose(0, 1))
            ref_feats.append([hn[-1], hn[-1]])
    torch.testing.assert_close(res.cka, minibatch_cka_matrix(ref_feats)[:1, :1], atol=TOL, rtol=0)
    assert res.shapes == {"lstm": (12,)}


class Encoder(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.proj = nn.Linear(4, d)

    def forward(self, x, attention_mask):
        return self.enc(self.proj(x), src_key_padding_mask=attention_mask == 0)

    def reference(self, x, mask):
        # grad enabled: PyTorch's fused inference fast path is not taken; plain math per layer
        with torch.enable_grad():
            h, outs = self.proj(x), []
            for layer in self.enc.layers:
                h = layer(h, src_key_padding_mask=mask == 0)
                m = mask.unsqueeze(-1).to(h.dtype)
                outs.append(((h * m).sum(1) / m.sum(1)).detach())
        return outs


def _seq_data(n_batches=3, b=10, t=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(2, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None] < lengths[:, None]).long()
        out.append({"x": torch.randn(b, t, 4, generator=g), "attention_mask": mask, "labels": lengths})
    return out


def test_transformer_encoder_masked_mean():
    net = Encoder()
    data = _seq_data()
    res = analyze(net, data, layers=nn.TransformerEncoderLayer, reduce="mean", progress=False)
    assert res.layers == ["enc.layers.0", "enc.layers.1"]
    ref = minibatch_cka_matrix([net.reference(d["x"], d["attention_mask"]) for d in data])
    torch.testing.assert_close(res.cka, ref, atol=TOL, rtol=0)


def test_transformer_default_selection_records_what_runs_in_forward_order():
    net = Encoder()
    with LayerCapture(net) as cap:
        with torch.no_grad():
            d = _seq_data(1)[0]
            net(d["x"], d["attention_mask"])
    names = list(cap.features)
    # out_proj is a Linear that MultiheadAttention uses by weight only: it never runs as a module
    assert names == ["proj", "enc.layers.0.self_attn", "enc.layers.0.linear1", "enc.layers.0.linear2", "enc.layers.0",
                     "enc.layers.1.self_attn", "enc.layers.1.linear1", "enc.layers.1.linear2", "enc.layers.1"]
    with pytest.raises(ValueError, match="did not run"):
        analyze(net, _seq_data(1), layers=["enc.layers.0.self_attn.out_proj"], progress=False)


def test_sequence_reductions_cls_tokens_against_explicit():
    net = Encoder()
    data = _seq_data(2)
    with torch.enable_grad():
        outs = []
        for d in data:
            h = net.enc.layers[0](net.proj(d["x"]), src_key_padding_mask=d["attention_mask"] == 0).detach()
            outs.append(h)
    for reduce, fn in [("cls", lambda h, m: h[:, 0]), ("tokens", lambda h, m: h[m.bool()]),
                       ("flatten", lambda h, m: h.flatten(1))]:
        res = analyze(net, data, layers="enc.layers.0", reduce=reduce, progress=False)
        ref = [[fn(h, d["attention_mask"])] for h, d in zip(outs, data)]
        torch.testing.assert_close(res.cka, minibatch_cka_matrix(ref), atol=TOL, rtol=0)
    res = analyze(net, data, layers="enc.layers.0", reduce="tokens", progress=False)
    assert res.n_samples == 20  # samples counted are the batch's inputs


def test_avgpool_and_per_layer_reduce_dict():
    net = InplaceCNN()
    data = _batches(3, 12, 3, 8, 8)
    res = analyze(net, data, reduce={"conv*": "avgpool", "fc": "flatten"}, progress=False)
    ref = []
    for x in data:
        c1, c2, fc = net.reference(x)
        ref.append([c1.view(12, 8, 64).mean(2), c2.view(12, 16, 16).mean(2), fc])
    torch.testing.assert_close(res.cka, minibatch_cka_matrix(ref), atol=TOL, rtol=0)


def test_bert_from_tiny_random_config():
    transformers = pytest.importorskip("transformers", reason="transformers not installed: BertModel test skipped")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    net = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(5)
    data = []
    for _ in range(3):
        ids = torch.randint(1, 50, (8, 9), generator=g)
        mask = (torch.arange(9)[None] < torch.randint(3, 10, (8, 1), generator=g)).long()
        data.append({"input_ids": ids, "attention_mask": mask})
    res = analyze(net, data, layers=type(net.encoder.layer[0]), reduce="mean", progress=False)
    assert res.layers == ["encoder.layer.0", "encoder.layer.1"]
    ref = []
    with torch.no_grad():
        for d in data:
            hs = net(**d, output_hidden_states=True).hidden_states[1:]  # outputs of the 2 BertLayers
            m = d["attention_mask"].unsqueeze(-1).float()
            ref.append([(h * m).sum(1) / m.sum(1) for h in hs])
    torch.testing.assert_close(res.cka, minibatch_cka_matrix(ref), atol=TOL, rtol=0)

    # a module returning a ModelOutput: its last_hidden_state is recorded
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = net

        def forward(self, **kw):
            return self.bert(**kw).pooler_output

    res = analyze(Wrap(), data, layers=["bert", "bert.pooler"], reduce={"bert": "cls", "*": "flatten"},
                  progress=False)
    with torch.no_grad():
        ref = [[o.last_hidden_state[:, 0], o.pooler_output] for o in (net(**d) for d in data)]
    torch.testing.assert_close(res.cka, minibatch_cka_matrix(ref), atol=TOL, rtol=0)
    assert res.layers == ["bert.pooler", "bert"] and res.shapes["bert"] == (9, 16)


def test_repeated_module_recorded_per_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(6, 9), nn.Linear(9, 5), nn.Tanh()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    net = Shared()
    data = _batches(3, 10, 6)
    res = analyze(net, data, layers=["act", nn.Linear], progress=False)
    assert res.layers == ["a", "act", "b", "act#1"]
    with torch.no_grad():
        ref = []
        for x in data:
            a = net.a(x)
            b = net.b(torch.tanh(a))
            ref.append([a, torch.tanh(a), b, torch.tanh(b)])
    torch.testing.assert_close(res.cka, minibatch_cka_matrix(ref), atol=TOL, rtol=0)


def test_compare_to_two_models_and_streaming_equals_one_shot():
    torch.manual_seed(1)
    a, b = InplaceCNN(), InplaceCNN()
    data = _batches(5, 8, 3, 8, 8)
    res = analyze(a, data, compare_to=b, progress=False)
    assert res.layers == res.layers_b == ["conv1", "conv2", "fc"]
    ref = minibatch_cka_matrix([a.reference(x) for x in data], [b.reference(x) for x in data])
    torch.testing.assert_close(res.cka, ref, atol=TOL, rtol=0)
    # the same batches fed one at a time to the accumulator, and through a DataLoader
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.cat(data), torch.zeros(40)), batch_size=8)
    res2 = analyze(a, loader, compare_to=b, progress=False, max_batches=5)
    torch.testing.assert_close(res2.cka, res.cka, atol=1e-12, rtol=0)
    acc = hierfast.stats.MinibatchCKA()
    for x in data:
        acc.update(a.reference(x), b.reference(x))
    torch.testing.assert_close(res.cka, acc.compute(), atol=1e-12, rtol=0)
    half = analyze(a, data, compare_to=b, progress=False, max_batches=2)
    assert half.n_batches == 2 and half.n_samples == 16


def test_results_save_load_to_dict_plot(tmp_path):
    net = InplaceCNN()
    res = analyze(net, _batches(2, 8, 3, 8, 8), progress=False)
    path = res.save(tmp_path / "r")
    back = Results.load(tmp_path / "r")
    assert path.name == "results.json" and (tmp_path / "r" / "results.npz").exists()
    assert back.layers == res.layers and back.shapes == res.shapes and back.n_samples == res.n_samples
    assert torch.equal(back.cka, res.cka) and back.cka.dtype == torch.float64
    d = res.to_dict()
    assert d["cka"] == res.cka.tolist() and d["layers"] == res.layers
    import json

    json.dumps(d)
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    ax = res.plot_cka()
    assert [t.get_text() for t in ax.get_yticklabels()] == res.layers
    with pytest.raises(AttributeError, match="statistics computed"):
        res.probe


# -- selection and bad input ------------------------------------------------------------------
class Aliased(nn.Module):
    """``self.shared`` is another name of ``self.a`` (named_modules lists it once, as "a")."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.shared = self.a
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(self.shared(x).relu())


def test_a_module_alias_selects_the_module_under_its_first_name():
    net = Aliased()
    x = torch.randn(8, 4)
    assert net.get_submodule("shared") is net.a
    assert LayerCapture(net, ["shared", "b"]).names == ["a", "b"]
    res = analyze(net, [x], layers=["shared", "b"], stats=("sparsity",), progress=False)
    with torch.no_grad():
        ref = torch.stack([(net.a(x) > 0).double().mean(), (net(x) > 0).double().mean()])
    assert res.layers == ["a", "b"]
    torch.testing.assert_close(res.sparsity, ref, atol=1e-12, rtol=0)


def test_selection_kinds_and_unknown_names():
    net = InplaceCNN()
    assert LayerCapture(net, "conv*").names == ["conv1", "conv2"]
    assert LayerCapture(net, nn.ReLU).names == ["relu1", "relu2"]
    assert LayerCapture(net, lambda n, m: n.endswith("2")).names == ["conv2", "relu2"]
    assert LayerCapture(net, ["fc", "conv1"]).names == ["conv1", "fc"]
    with pytest.raises(ValueError, match="closest names: 'conv2', 'conv1'"):
        LayerCapture(net, ["conv3"])
    with pytest.raises(ValueError, match="matches no submodule"):
        LayerCapture(net, "layer*.conv1")
    with pytest.raises(ValueError, match="no submodule of InplaceCNN is a LSTM"):
        LayerCapture(net, nn.LSTM)
    with pytest.raises(ValueError, match="no layer matched"):
        LayerCapture(net, lambda n, m: False)
    with pytest.raises(ValueError, match="no conv, linear"):
        LayerCapture(nn.Sequential(nn.ReLU(), nn.Tanh()))
    with pytest.raises(TypeError, match="entries must be"):
        LayerCapture(net, [3])
    with pytest.raises(ValueError, match="reduce must be"):
        LayerCapture(net, reduce="max")
    with pytest.raises(ValueError, match="compare_to: .*'conv1'.*layers_b="):
        analyze(net, _batches(1, 8, 3, 8, 8), layers=["conv1"], compare_to=RNNStack(), progress=False)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"model": [1, 2]}, TypeError, "model must be a torch.nn.Module, got list"),
    ({"model": None}, TypeError, "model must be a torch.nn.Module"),
    ({"data": None}, TypeError, "data must be an iterable of batches.*NoneType"),
    ({"data": 5}, TypeError, "data must be an iterable of batches.*int"),
    ({"stats": None}, TypeError, "stats must be a statistic name"),
    ({"stats": ("cka", 3)}, TypeError, "stats entries must be statistic names"),
    ({"stats": {"cka": {"debiased": False}}}, TypeError, r"stats\['cka'\] options \['debiased'\]"),
    ({"max_batches": True}, ValueError, "max_batches must be a positive int or None, got True"),
    ({"max_batches": 0}, ValueError, "max_batches must be a positive int"),
    ({"checkpoint_every": False}, ValueError, "checkpoint_every must be a positive int"),
    ({"device": "nonsense"}, ValueError, "device='nonsense' is not a torch device"),
])
def test_bad_arguments_are_named_up_front(kwargs, exc, match):
    calls = []
    net = InplaceCNN()
    net.register_forward_pre_hook(lambda m, a: calls.append(1))
    args = {"model": net, "data": _batches(1, 8, 3, 8, 8)} | kwargs
    model, data = args.pop("model"), args.pop("data")
    with pytest.raises(exc, match=match):
        analyze(model, data, progress=False, **args)
    if "stats" not in kwargs or not isinstance(kwargs["stats"], dict):
        assert not calls  # rejected before any forward


def test_bad_data():
    net = InplaceCNN()
    with pytest.raises(ValueError, match="no batches"):
        analyze(net, [], progress=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        analyze(net, torch.randn(8, 3, 8, 8), progress=False)
    with pytest.raises(TypeError, match="batch 0"):
        analyze(net, ["text"], progress=False)
    with pytest.raises(ValueError, match="unknown statistic 'nope'"):
        analyze(net, _batches(1, 8, 3, 8, 8), stats=("nope",), progress=False)
    with pytest.raises(ValueError, match="avgpool"):
        analyze(net, _batches(1, 8, 3, 8, 8), layers="fc", reduce="avgpool", progress=False)
    with pytest.raises(ValueError, match="on_nonfinite"):
        analyze(net, _batches(1, 8, 3, 8, 8), on_nonfinite="ignore", progress=False)


def test_mismatched_batch_sizes_between_models():
    class Drop(nn.Module):  # a model that loses a sample: its features cannot pair with the other's
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x[1:])

    with pytest.raises(ValueError, match="mismatched sample counts at batch 0"):
        analyze(nn.Sequential(nn.Linear(4, 4)), _batches(2, 8, 4), compare_to=Drop(), progress=False)
    # (num_layers, N, H) state picked by output_fn: not one row per sample
    gru = nn.Sequential(nn.GRU(5, 4, num_layers=2, batch_first=True))
    with pytest.raises(ValueError, match="not batch-first"):
        analyze(gru, _batches(1, 8, 6, 5), output_fn=lambda o: o[1], progress=False)


class NaNAt(nn.Module):
    """Linear -> Linear; the second layer's output is NaN on batch ``bad`` (counted per forward)."""

    def __init__(self, bad):
        super().__init__()
        self.l1, self.l2, self.bad, self.calls = nn.Linear(5, 6), nn.Linear(6, 3), bad, 0

    def forward(self, x):
        h = self.l1(x)
        if self.calls == self.bad:
            h = h.clone()
            h[2, 1] = math.nan
        self.calls += 1
        return self.l2(h)


def test_nan_activations_raise_naming_layer_and_batch_or_skip():
    data = _batches(4, 8, 5)
    with pytest.raises(ValueError, match=r"layer 'l2' of model produced NaN or inf at batch 2 \(first at sample 2\)"):
        analyze(NaNAt(2), data, progress=False)
    net = NaNAt(2)
    with pytest.warns(RuntimeWarning, match="skipped 1 batch"):
        res = analyze(net, data, on_nonfinite="skip", progress=False)
    assert res.n_batches == 3 and res.n_skipped == 1 and res.n_samples == 24
    kept = [data[i] for i in (0, 1, 3)]
    with torch.no_grad():
        ref = minibatch_cka_matrix([[net.l1(x), net.l2(net.l1(x))] for x in kept])
    torch.testing.assert_close(res.cka, ref, atol=TOL, rtol=0)
    assert torch.isfinite(res.cka).all()


def test_layer_capture_standalone_each_forward_fresh():
    net = InplaceCNN()
    x = torch.randn(4, 3, 8, 8)
    with LayerCapture(net, ["conv1"]) as cap, torch.no_grad():
        net(x)
        net(x)
        assert list(cap.features) == ["conv1"]
        torch.testing.assert_close(cap.features["conv1"], net.conv1(x).flatten(1))
    assert not net.conv1._forward_hooks


# -- the statistic-plugin protocol ------------------------------------------------------------
class FlipStat:
    """A plugin using every part of the protocol: per layer, the float64 sum over samples of
    <f(x), f(-x)> and of the labels; ``batch.forward`` runs the models on the flipped inputs."""

    def __init__(self, layers_a, layers_b=None, *, scale=1.0):
        self.layers_a, self.layers_b, self.scale = list(layers_a), layers_b, scale
        self.dot = torch.zeros(len(layers_a), dtype=torch.float64)
        self.labels = torch.zeros((), dtype=torch.float64)
        self.batches = []

    def update_batch(self, feats_a, feats_b, batch):
        assert isinstance(batch, BatchContext) and list(feats_a) == self.layers_a
        fa2, fb2 = batch.forward(-batch.inputs)
        assert (fb2 is None) == (feats_b is None)
        self.dot += self.scale * torch.stack([(feats_a[k].double() * fa2[k].double()).sum() for k in self.layers_a])
        self.labels += batch.labels.double().sum() if batch.labels is not None else 0.0
        self.batches.append(batch.index)

    def compute(self):
        return {"dot": self.dot.clone(), "labels": float(self.labels), "batches": list(self.batches)}

    def state_dict(self):
        return {"dot": self.dot.clone(), "labels": self.labels.clone(), "batches": list(self.batches)}

    def load_state_dict(self, state):
        self.dot, self.labels, self.batches = state["dot"].clone(), state["labels"].clone(), list(state["batches"])
        return self

    def sync(self, group=None):
        return self


register_statistic("test_flip", FlipStat)


def test_statistic_plugin_protocol(tmp_path):
    net = InplaceCNN()
    data = [(x, torch.full((x.shape[0],), 2.0)) for x in _batches(3, 8, 3, 8, 8)]
    res = analyze(net, data, stats={"cka": {}, "test_flip": {"scale": 0.5}}, progress=False)
    ref = torch.zeros(3, dtype=torch.float64)
    for x, _ in data:
        for i, (u, v) in enumerate(zip(net.reference(x), net.reference(-x))):
            ref[i] += 0.5 * (u.double() * v.double()).sum()
    torch.testing.assert_close(res.test_flip["dot"], ref, rtol=1e-6, atol=1e-6)
    assert res.test_flip["labels"] == 48.0 and res.test_flip["batches"] == [0, 1, 2]
    torch.testing.assert_close(res.cka, minibatch_cka_matrix([net.reference(x) for x, _ in data]), atol=TOL, rtol=0)
    back = Results.load(res.save(tmp_path / "r.json"))
    assert torch.equal(back.test_flip["dot"], res.test_flip["dot"]) and back.test_flip["batches"] == [0, 1, 2]
    with pytest.raises(ValueError, match="already registered"):
        register_statistic("test_flip", lambda a, b: None)
    with pytest.raises(ValueError, match="identifier"):
        register_statistic("not a name", FlipStat)


def test_time_major_transformer_default_selection():
    """batch_first=False: the layer, its attention and the Linears inside see (T, N, D)."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(8, nhead=2, dim_feedforward=12, dropout=0.0)  # batch_first=False
    net = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    data = [torch.randn(5, 11, 8) for _ in range(2)]  # (T=5, N=11, D=8)
    res = analyze(net, data, progress=False, output_fn=None)
    assert res.layers == ["layers.0.self_attn", "layers.0.linear1", "layers.0.linear2", "layers.0"]
    ref = []
    with torch.enable_grad():  # the plain math path, layer by layer
        for x in data:
            L = net.layers[0]
            sa = L.self_attn(x, x, x, need_weights=False)[0]
            h = L.norm1(x + sa)
            l1 = L.linear1(h)
            l2 = L.linear2(L.activation(l1))
            out = L.norm2(h + l2)
            ref.append([t.detach().transpose(0, 1).reshape(11, -1) for t in (sa, l1, l2, out)])
    torch.testing.assert_close(res.cka, minibatch_cka_matrix(ref), atol=TOL, rtol=0)
    assert res.n_samples == 2 * 11  # rows of the (batch-first) features, not the inputs' first dimension


def test_output_structures_default_and_output_fn():
    class Out:  # a ModelOutput-like object
        def __init__(self, h):
            self.last_hidden_state, self.pooler_output = h, h[:, 0]

    class Multi(nn.Module):
        def __init__(self, kind):
            super().__init__()
            self.kind, self.fc = kind, nn.Linear(4, 6)

        def forward(self, x):
            h = self.fc(x)
            return {"tuple": lambda: (None, [h, h * 2]), "dict": lambda: {"logits": h * 3, "other": h},
                    "hf_dict": lambda: {"x": h * 2, "last_hidden_state": h},
                    "object": lambda: Out(h), "none": lambda: (None, "text")}[self.kind]()

    x = torch.randn(6, 4)
    for kind, scale in [("tuple", 1), ("dict", 3), ("hf_dict", 1), ("object", 1)]:
        net = nn.Sequential(Multi(kind))
        with LayerCapture(net, ["0"]) as cap, torch.no_grad():
            net(x)
            torch.testing.assert_close(cap.features["0"], scale * net[0].fc(x))
    net = nn.Sequential(Multi("none"))
    with pytest.raises(TypeError, match="no tensor"), LayerCapture(net, ["0"]), torch.no_grad():
        net(x)
    net = nn.Sequential(Multi("dict"))
    with LayerCapture(net, ["0"], output_fn=lambda name, mod, out: out["other"] + len(name)) as cap, \
            torch.no_grad():
        net(x)
        torch.testing.assert_close(cap.features["0"], net[0].fc(x) + 1)
    with pytest.raises(TypeError, match="output_fn returned str"), LayerCapture(net, ["0"], output_fn=lambda o: "x"), \
            torch.no_grad():
        net(x)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, TOL)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dtypes_and_channels_last(dtype, tol, channels_last):
    net = InplaceCNN().to(dtype)
    data = [x.to(dtype) for x in _batches(3, 9, 3, 8, 8, seed=11)]
    if channels_last:  # conv outputs are then non-contiguous in NCHW order: flatten must copy correctly
        net = net.to(memory_format=torch.channels_last)
        data = [x.contiguous(memory_format=torch.channels_last) for x in data]
    res = analyze(net, data, progress=False)
    ref = minibatch_cka_matrix([net.reference(x) for x in data])
    torch.testing.assert_close(res.cka, ref, atol=tol, rtol=0)


def test_progress_bar_silent_without_tty_and_mask_errors(capsys):
    net = InplaceCNN()
    analyze(net, _batches(2, 8, 3, 8, 8), progress=True)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal
    data = _seq_data(1)
    data[0]["attention_mask"][3] = 0
    with pytest.raises(ValueError, match="keeps no token"):
        analyze(Encoder(), data, layers="proj", reduce="mean", progress=False)
    with pytest.raises(ValueError, match=r"needs \(N, T, D\)"):
        analyze(net, _batches(1, 8, 3, 8, 8), layers="fc", reduce="cls", progress=False)


def test_to_device_is_asynchronous_only_from_the_host():
    """A copy from the host may be non-blocking (stream-ordered before the model's kernels); one
    from a device may not (the host would read the tensor before the copy lands). A meta tensor
    stands in for a GPU source on this CPU-only machine."""
    from torch.overrides import TorchFunctionMode

    from hierfast.capture._data import to_device

    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.to:
                seen.append((args[0].device.type, kwargs.get("non_blocking", False)))
            return func(*args, **kwargs)

    with Record():
        out = to_device({"a": torch.ones(2), "b": [torch.empty(2, device="meta")]}, "meta")
    assert seen == [("cpu", True), ("meta", False)]
    assert out["a"].device.type == "meta" and isinstance(out["b"], list)

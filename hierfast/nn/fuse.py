"""``fuse(model)``: Conv2d [+ BatchNorm2d (eval, folded)] + activation -> ``Conv2dAct``.

Two passes: (1) every ``nn.Sequential`` run ``Conv2d, [BatchNorm2d], activation``
(the BN and activation slots become ``nn.Identity`` so other indices and state_dict
keys stay put); (2) when Conv2d layers remain outside such runs, a ``torch.fx``
trace, fusing ``conv -> [bn] -> activation`` chains whose intermediate results have no
other user (a BN whose output has others is folded without the activation), each module
called once in ``forward``: of the model (then the returned model is a ``GraphModule``), or, where the
model is an ``nn.Sequential`` (its indices stay) or cannot be traced, of each child that
holds such convs, recursively (``nn.Sequential(*resnet.children())[:-1]``-style feature
extractors, models with data-dependent control flow around traceable blocks).
"""
from __future__ import annotations

import collections
import copy

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize
from torch import fx, nn

from ..ops import activations as A
from .conv_act import Conv2dAct, parameters_shareable

# activation modules -> (name, kwargs)
_ACT_MODULES = {
    nn.ReLU: lambda m: ("relu", {}), nn.ReLU6: lambda m: ("relu6", {}),
    nn.LeakyReLU: lambda m: ("leaky_relu", {"negative_slope": m.negative_slope}),
    nn.GELU: lambda m: ("gelu", {"approximate": m.approximate}), nn.SiLU: lambda m: ("silu", {}),
    nn.Hardswish: lambda m: ("hardswish", {}), nn.Sigmoid: lambda m: ("sigmoid", {}),
    nn.Tanh: lambda m: ("tanh", {}), nn.Mish: lambda m: ("mish", {}),
}
# activation functions / methods in fx graphs -> name (kwargs read from the call)
_ACT_FUNCS = {F.relu: "relu", torch.relu: "relu", F.relu_: "relu", torch.relu_: "relu", F.relu6: "relu6",
              F.leaky_relu: "leaky_relu", F.gelu: "gelu", F.silu: "silu", F.hardswish: "hardswish",
              torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.mish: "mish"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}


def _hooked(m: nn.Module) -> str | None:
    """What a fused layer would silently drop of ``m``: its hooks or parametrizations (pruning
    masks, weight norm, a capture's forward hooks); None when it has none."""
    kinds = [kind for kind, hooks in (("forward hooks", m._forward_hooks), ("forward pre-hooks", m._forward_pre_hooks),
                                      ("backward hooks", m._backward_hooks),
                                      ("backward pre-hooks", getattr(m, "_backward_pre_hooks", {})))
             if hooks]
    if torch.nn.utils.parametrize.is_parametrized(m):
        kinds.append("parametrizations")
    return " and ".join(kinds) or None


def _hook_reason(*modules) -> str | None:
    """Why these modules may not be fused away (the first one's hooks), or None."""
    for m in modules:
        kinds = m is not None and _hooked(m)
        if kinds:
            return f"{type(m).__name__} has {kinds}, which a fused layer would drop; remove them to fuse"
    return None


def _plain_conv(m) -> bool:
    """Convs we may replace: nn.Conv2d itself, or a Conv2dAct still without activation."""
    if type(m) is nn.Conv2d:
        return True
    return isinstance(m, Conv2dAct) and m.activation.code == A.IDENTITY and not m.track_stats


def _foldable_bn(bn, conv) -> str | None:
    """None when ``bn`` can be folded into ``conv``, else why not."""
    if type(bn) is not nn.BatchNorm2d:
        return "not a BatchNorm2d"
    if bn.training:
        return "BatchNorm2d is in training mode (batch statistics); call model.eval() to fold it"
    if bn.running_mean is None:
        return "BatchNorm2d has no running statistics (track_running_stats=False)"
    if bn.num_features != conv.out_channels:
        return "BatchNorm2d channels differ from the conv's"
    return None


def _shared_parameters(model: nn.Module) -> set:
    """ids of the parameters a BN fold would untie: held by more than one module object (tied
    by hand), or held by a module object that sits in more than one (parent, key) slot
    (``nn.Sequential(c, nn.ReLU(), c)``). A reused container (``nn.Sequential(blk, blk)``) is
    not sharing: its convs sit in one slot of one parent, so one fold inside it serves all uses."""
    holders, slots = collections.defaultdict(set), collections.defaultdict(set)
    for m in model.modules():  # each module object once
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)].add(id(m))
        for key, child in m._modules.items():
            if child is not None:
                slots[id(child)].add((id(m), key))
    return {pid for pid, ms in holders.items() if len(ms) > 1 or any(len(slots[mid]) > 1 for mid in ms)}


def _tied_reason(conv: nn.Conv2d, bn, shared: set) -> str | None:
    """Why folding ``bn`` into ``conv`` would be wrong: the folded weights are new tensors, so
    parameters ``conv`` shares with another place would come untied (and drift in training)."""
    if bn is not None and any(p is not None and id(p) in shared for p in (conv.weight, conv.bias)):
        return ("Conv2d's parameters are shared with another layer (tied weights, or the module at several "
                "places); folding the BatchNorm into them would untie them")
    return None


def _fused(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act_name: str, act_kwargs: dict) -> Conv2dAct:
    """The replacement layer: without BN it holds ``conv``'s own Parameter objects (ties and
    optimizers keep working); BN folded in float64 into new ones: w' = w * s,
    b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps), trainable as ``conv.weight`` was."""
    if bn is None:
        return Conv2dAct.from_conv(conv, act_name, share_parameters=parameters_shareable(conv), **act_kwargs)
    m = Conv2dAct.from_conv(conv, act_name, **act_kwargs)
    with torch.no_grad():
        w = conv.weight.to(torch.float64)
        var, mean = bn.running_var.to(torch.float64), bn.running_mean.to(torch.float64)
        gamma = bn.weight.to(torch.float64) if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias.to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
        s = gamma / torch.sqrt(var + bn.eps)
        b = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(var)
        if m.bias is None:
            m.bias = nn.Parameter(torch.empty_like(conv.weight[:, 0, 0, 0]))
        m.weight.copy_(w * s[:, None, None, None])
        m.bias.copy_((b - mean) * s + beta)
    m.bias.requires_grad_(conv.weight.requires_grad)  # the folded bias holds the BN's shift
    return m


def _act_of_module(m):
    f = _ACT_MODULES.get(type(m))
    return f(m) if f else None


def _fuse_sequentials(model: nn.Module, report: list, shared: set) -> None:
    for prefix, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)
        i = 0
        while i < len(keys):
            conv = seq._modules[keys[i]]
            if not _plain_conv(conv):
                if isinstance(conv, nn.Conv2d) and torch.nn.utils.parametrize.is_parametrized(conv):
                    report.append({"layer": _join(prefix, keys[i]), "fused": False, "reason": _hook_reason(conv)})
                i += 1
                continue
            j, bn = i + 1, None
            if j < len(keys) and isinstance(seq._modules[keys[j]], nn.modules.batchnorm._BatchNorm):
                why = _foldable_bn(seq._modules[keys[j]], conv)
                if why:
                    report.append({"layer": _join(prefix, keys[i]), "fused": False, "reason": why})
                    i = j + 1
                    continue
                bn, j = seq._modules[keys[j]], j + 1
            act = _act_of_module(seq._modules[keys[j]]) if j < len(keys) else None
            if act is None and bn is None:
                i += 1
                continue
            why = _tied_reason(conv, bn, shared) or _hook_reason(conv, bn, seq._modules[keys[j]] if act else None)
            if why:
                report.append({"layer": _join(prefix, keys[i]), "fused": False, "reason": why})
                i = j + (1 if act else 0)
                continue
            name, kw = act if act else ("identity", {})
            seq._modules[keys[i]] = _fused(conv, bn, name, kw)
            replaced = [keys[k] for k in range(i + 1, j + (1 if act else 0))]
            for k in replaced:
                seq._modules[k] = nn.Identity()
            report.append({"layer": _join(prefix, keys[i]), "fused": True, "batchnorm": bn is not None,
                           "activation": str(seq._modules[keys[i]].activation),
                           "replaced": [_join(prefix, k) for k in replaced], "pass": "sequential"})
            i = j + (1 if act else 0)


def _join(prefix, name):
    return f"{prefix}.{name}" if prefix else name


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, Conv2dAct) or super().is_leaf_module(m, qualname)


def _act_of_node(node, modules):
    if node.op == "call_module":
        return _act_of_module(modules[node.target])
    if node.op == "call_function" and node.target in _ACT_FUNCS:
        name = _ACT_FUNCS[node.target]
        kw = {}
        if name == "leaky_relu":
            kw["negative_slope"] = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
        if name == "gelu":
            kw["approximate"] = node.kwargs.get("approximate", "none")
        return name, kw
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1 and not node.kwargs:
        return _ACT_METHODS[node.target], {}
    return None


def _has_plain_conv(module: nn.Module) -> bool:
    return any(type(m) is nn.Conv2d for m in module.modules())


def _fuse_fx_tree(module: nn.Module, report: list, shared: set, prefix: str = "") -> nn.Module:
    """The fx pass on ``module``, or, where it is an ``nn.Sequential`` (whose indices must stay)
    or cannot be traced, on each child that holds a plain Conv2d; returns the module to use."""
    if not _has_plain_conv(module) or type(module) is nn.Conv2d:
        return module
    if not isinstance(module, nn.Sequential):
        try:
            graph = _Tracer().trace(module)
        except Exception as exc:  # noqa: BLE001 - untraceable: its children are tried one by one
            report.append({"layer": prefix or "<model>", "fused": False,
                           "reason": f"torch.fx could not trace {prefix or 'the model'} ({type(exc).__name__}: "
                                     f"{exc}); its children were traced one by one, its own convs left alone"})
        else:
            return _fuse_graph(module, graph, report, shared, prefix)
    for name, child in list(module.named_children()):
        new = _fuse_fx_tree(child, report, shared, _join(prefix, name))
        if new is not child:
            module._modules[name] = new
    return module


def _chain(node, modules):
    """``(bn_node, act_node, act)`` after conv ``node``: the BatchNorm and activation calls that
    follow it, each the sole user of the value before it (None where there is none)."""
    if len(node.users) != 1:
        return None, None, None
    nxt, bn_node = next(iter(node.users)), None
    if nxt.op == "call_module" and isinstance(modules[nxt.target], nn.modules.batchnorm._BatchNorm):
        bn_node = nxt
        if len(nxt.users) != 1:
            return bn_node, None, None  # the BN's output is used elsewhere too: fold it, no activation
        nxt = next(iter(nxt.users))
    act = _act_of_node(nxt, modules) if nxt.args and nxt.args[0] is (bn_node or node) else None
    return bn_node, (nxt if act else None), act


def _repeated_call_reason(gm, calls, *nodes) -> str | None:
    """Why these module calls may not be fused: one module called at several places of
    ``forward`` (replacing it would give every call the activation / folded BN of one)."""
    for n in nodes:
        if n is not None and calls[n.target] > 1:
            kind = type(gm.get_submodule(n.target)).__name__
            return (f"{kind} '{n.target}' is called at {calls[n.target]} places in forward; fusing one call would "
                    "change them all")
    return None


def _refuse(report, layer, why):
    if not any(r["layer"] == layer and not r["fused"] for r in report):  # once (the Sequential pass's, a repeat)
        report.append({"layer": layer, "fused": False, "reason": why})


def _fuse_graph(model: nn.Module, graph, report: list, shared: set, prefix: str):
    gm = fx.GraphModule(model, graph)
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not _plain_conv(modules.get(node.target)):
            continue
        bn_node, act_node, act = _chain(node, modules)
        if bn_node is None and act_node is None:
            continue
        conv = modules[node.target]
        bn = modules[bn_node.target] if bn_node is not None else None
        why = (_repeated_call_reason(gm, calls, node, bn_node) or (bn is not None and _foldable_bn(bn, conv))
               or _tied_reason(conv, bn, shared)
               or _hook_reason(conv, bn, modules[act_node.target] if act_node is not None
                               and act_node.op == "call_module" else None))
        if why:
            _refuse(report, _join(prefix, node.target), why)
            continue
        name, kw = act if act else ("identity", {})
        dead = [d for d in (bn_node, act_node) if d is not None]
        fused = _fused(conv, bn, name, kw)
        _set_submodule(gm, node.target, fused)
        dead[-1].replace_all_uses_with(node)
        for d in reversed(dead):
            gm.graph.erase_node(d)
        changed = True
        report.append({"layer": _join(prefix, node.target), "fused": True, "batchnorm": bn is not None,
                       "activation": str(fused.activation), "replaced": [d.name for d in dead],
                       "pass": "fx"})
    if not changed:
        return model
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the folded BatchNorms
    return gm


def _set_submodule(root, target, new):
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def fuse(model: nn.Module, inplace: bool = False):
    """Replace Conv2d [+ BatchNorm2d in eval mode, folded] + activation by ``Conv2dAct``.

    Args:
        model: any ``nn.Module``. BatchNorm is folded only in eval mode (running stats).
        inplace: modify ``model`` itself (else a deep copy). Where the fx pass fuses the model
            as a whole, it returns a new ``GraphModule`` either way. A fused layer without BN
            keeps the conv's own ``Parameter`` objects; one with BN folded has NEW ones: an
            optimizer built before fusing must be rebuilt (on ``fused_model.parameters()``).

    Fused layers keep ``requires_grad`` (a folded layer is trainable as its conv's weight was),
    and tied parameters stay tied. Left alone (and reported): a conv or BN module called at more
    than one place of ``forward``, a BN fold into a conv whose parameters are shared with
    another place, BN in training mode or without running statistics, hooked layers.

    Returns:
        ``(fused_model, report)``: report is a list of dicts, one per candidate layer:
        ``layer``, ``fused``, and ``activation``/``batchnorm``/``replaced``/``pass`` or
        ``reason`` (why a layer was left alone).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        try:
            model = copy.deepcopy(model)
        except RuntimeError as exc:  # e.g. a pruned or weight-normed module after a forward
            raise ValueError(f"fuse(model) works on a copy, and torch cannot copy this model ({exc}); "
                             "pass inplace=True to fuse it in place") from exc
    report: list = []
    shared = _shared_parameters(model)
    _fuse_sequentials(model, report, shared)
    model = _fuse_fx_tree(model, report, shared)
    return model, report

"""Activation maximisation: synthesise the input that most excites each channel of a layer.

All requested channels (x diversity samples) are optimised together: one batch, one
forward/backward per step, and the forward is stopped at the target layer by a hook that
raises a private exception once it has the activations, so nothing above the layer runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..capture._outputs import pick_output
from ..capture._select import select_layers
from . import _param

PARAMS = ("fourier", "pixel")
OBJECTIVES = ("channel", "neuron")


def _is_fused_conv(mod) -> bool:
    from ..nn import Conv2dAct

    return isinstance(mod, Conv2dAct)


class _Stop(Exception):
    """Raised by the target layer's hook: the rest of the forward is not needed."""


_LOW = (torch.float16, torch.bfloat16)


def _upcast(acts: torch.Tensor) -> torch.Tensor:
    """Half-precision activations in float32: objectives and the diversity Gram matrices
    (sums over positions) would overflow or round in float16/bfloat16."""
    return acts.float() if acts.dtype in _LOW else acts


@dataclass
class Visualization:
    """Result of :func:`activation_maximization` for ``C`` channels (``S`` samples each).

    Attributes:
        layer: module name.
        channels: the ``C`` channel indices.
        images: ``(C, 3, H, W)`` (``(C, S, 3, H, W)`` when ``samples > 1``) in [0, 1], as the
            model saw them (grey replicated to 3 channels for 1-channel models).
        values: ``(C,)`` (``(C, S)``) objective of the final, untransformed images.
        history: ``(steps, C)`` objective per step (on the transformed images), mean over samples.
    """

    layer: str
    channels: list[int]
    images: torch.Tensor
    values: torch.Tensor
    history: torch.Tensor = field(repr=False)


def _input_channels(model: nn.Module) -> int:
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    leaves = [m for m in model.modules() if not list(m.children()) and any(True for _ in m.parameters(False))]
    if not convs or (leaves and isinstance(leaves[0], nn.Embedding)):
        first = type(leaves[0]).__name__ if leaves else "no parameterised layer"
        raise ValueError(f"activation_maximization needs an image model (built from nn.Conv2d); "
                         f"{type(model).__name__} starts with {first}. For token or vector models use "
                         "hierfast.visualize.top_activating(model, data, layers) to find the inputs that "
                         "excite each channel")
    c = convs[0].in_channels
    if c not in (1, 3):
        raise ValueError(f"the first Conv2d of {type(model).__name__} takes {c} input channels; "
                         "activation_maximization synthesises 1- or 3-channel images")
    return c


def _resolve_layer(model: nn.Module, layer) -> tuple[str, nn.Module]:
    if isinstance(layer, nn.Module):
        for n, m in model.named_modules():
            if m is layer:
                return n, m
        raise ValueError("layer is a module that is not part of model")
    if not isinstance(layer, str):
        raise TypeError(f"layer must be a submodule name (str) or module, got {type(layer).__name__}")
    hit = select_layers(model, layer, arg="layer")
    if len(hit) != 1:
        raise ValueError(f"layer={layer!r} matches {len(hit)} modules ({[n for n, _ in hit][:5]}); name one")
    return hit[0]


def _check(steps, size, param, objective, diversity, lr, tv, l2, transforms, samples):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (pixels), got {size!r}")
    if param not in PARAMS:
        raise ValueError(f"param must be one of {PARAMS}, got {param!r}")
    if not (callable(objective) or objective in OBJECTIVES):
        raise ValueError(f"objective must be one of {OBJECTIVES} or a callable f(acts, channels) -> (N,), "
                         f"got {objective!r}")
    if transforms not in ("standard", None) and not callable(transforms):
        raise ValueError(f"transforms must be 'standard', None or a callable f(images, generator), got {transforms!r}")
    for nm, v in (("diversity", diversity), ("tv", tv), ("l2", l2)):
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"{nm} must be a number >= 0, got {v!r}")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")


def _objective(objective, acts: torch.Tensor, chans: torch.Tensor, layer: str) -> torch.Tensor:
    """Per-image objective ``(N,)``; ``chans`` (N,) channel of each image."""
    if callable(objective):
        v = objective(acts, chans)
        if not isinstance(v, torch.Tensor) or v.shape != chans.shape:
            raise ValueError(f"objective callable must return an (N,) = {tuple(chans.shape)} tensor, got "
                             f"{getattr(v, 'shape', type(v).__name__)}")
        return v
    a = acts[torch.arange(acts.shape[0], device=acts.device), chans]  # (N, ...) own channel
    if objective == "channel" or a.dim() == 1:
        return a.flatten(1).mean(1) if a.dim() > 1 else a
    # neuron: the central unit
    idx = tuple(s // 2 for s in a.shape[1:])
    return a[(slice(None),) + idx]


def _diversity(acts: torch.Tensor, samples: int) -> torch.Tensor:
    """Lucid's diversity term per image (N,): minus the mean cosine similarity of its Gram
    matrix with those of the other samples of the same channel."""
    if samples < 2 or acts.dim() < 3:
        return acts.new_zeros(acts.shape[0])
    f = acts.flatten(2)  # (N, C, S)
    g = torch.bmm(f, f.transpose(1, 2)).flatten(1)
    g = torch.nn.functional.normalize(g, dim=1).view(-1, samples, g.shape[1])  # (C, S, C*C)
    sim = torch.bmm(g, g.transpose(1, 2))  # (C, S, S)
    off = (sim.sum(2) - sim.diagonal(dim1=1, dim2=2)) / (samples - 1)
    return -off.flatten()


def activation_maximization(model: nn.Module, layer, channels=None, *, steps: int = 256, size: int = 64,
                            param: str = "fourier", decorrelate: bool = True, transforms="standard",
                            objective="channel", diversity: float = 0.0, samples: int | None = None,
                            lr: float = 0.05, seed: int = 0, progress: bool = True, tv: float = 0.0,
                            l2: float = 0.0, preprocess=None, pre_activation: bool = True) -> Visualization:
    """Synthesise, for every requested channel of ``layer``, the image that maximises it.

    Args:
        model: an image model built from ``nn.Conv2d`` (or ``hierfast.nn.Conv2dAct``); its
            weights are not changed, it runs in eval mode, and its training flag and
            parameters' ``requires_grad`` are restored afterwards. The synthetic images do
            not count in its statistics taps (``hierfast.nn.paused_stats``). Any floating
            dtype: the images and Adam's state stay in float32 (float64 for a float64
            model) and are cast to the model's dtype at its input, so float16/bfloat16
            models optimise like float32 ones (Adam's ``eps`` underflows in float16).
        layer: submodule name (closest names listed if unknown) or the module.
        channels: int, list of ints, or None (all channels of the layer).
        steps: Adam steps. size: image side in pixels.
        param: ``"fourier"`` (1/f-scaled spectrum) or ``"pixel"``. decorrelate: ImageNet colour mixing.
        transforms: ``"standard"`` (pad, jitter, scale, rotate per step), None, or ``f(images, generator)``.
        objective: ``"channel"`` (mean over positions), ``"neuron"`` (the central unit) or
            ``f(acts, channels) -> (N,)`` where ``acts`` is the layer output ``(N, C, ...)``
            (float32 for a float16/bfloat16 model) and ``channels`` ``(N,)`` the channel
            assigned to each image.
        diversity: weight of Lucid's diversity term between the ``samples`` images of a
            channel. samples: images per channel (default 1, or 4 when ``diversity > 0``).
        lr: Adam learning rate. seed: seeds the initial image and the transforms.
        tv, l2: weights of total-variation and L2 (around grey 0.5) penalties.
        preprocess: optional ``f(images in [0, 1]) -> model input`` (e.g. normalisation),
            applied in the images' float32; its output is cast to the model's dtype.
        pre_activation: for a ``hierfast.nn.Conv2dAct`` layer, maximise the convolution's
            output before the activation (a ReLU's zero region has no gradient, so channels
            that start off would never move); ``values`` are then pre-activation values.
        progress: a tqdm bar over the steps (on by default; ``False`` in scripts and logs).

    Returns:
        :class:`Visualization` (images ``(C, 3, size, size)`` in [0, 1], values ``(C,)``,
        history ``(steps, C)``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    samples = (4 if diversity > 0 else 1) if samples is None else samples
    _check(steps, size, param, objective, diversity, lr, tv, l2, transforms, samples)
    in_ch = _input_channels(model)
    name, module = _resolve_layer(model, layer)
    try:
        p0 = next(model.parameters())
        device, dtype = p0.device, (p0.dtype if p0.is_floating_point() else torch.float32)
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    # Adam on float16 parameters fails at step 1 (its eps=1e-8 underflows: 0/0), and bfloat16
    # loses small updates: the image and the optimiser state are kept in at least float32.
    image_dtype = torch.promote_types(dtype, torch.float32)

    store: dict[str, torch.Tensor] = {}

    def hook(mod, args, out):
        if pre_activation and _is_fused_conv(mod):
            # a fused conv + ReLU-family output is 0 wherever the channel is off, and so is its
            # gradient: optimise the pre-activation instead (the Lucid practice of targeting the
            # conv before its nonlinearity), recomputed from the same input with the same weights
            store["acts"] = torch.nn.Conv2d._conv_forward(mod, args[0], mod.weight, mod.bias)
        else:
            store["acts"] = pick_output(mod, out, name)
        raise _Stop

    def run(img: torch.Tensor) -> torch.Tensor:
        x = img.mean(1, keepdim=True) if in_ch == 1 else img
        if preprocess is not None:
            x = preprocess(x)
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.to(dtype)  # differentiable: the float32 image gets the gradient
        try:
            model(x)
        except _Stop:
            return _upcast(store.pop("acts"))
        raise ValueError(f"layer {name!r} did not run in the model's forward")

    from ..nn.stats import paused_stats

    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handle = module.register_forward_hook(hook)
    model.eval()
    with paused_stats(model):  # synthetic images are not data: the taps must not count them
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with torch.no_grad():  # dry run: number of channels of the layer
                n_out = run(torch.full((1, 3, size, size), 0.5, device=device, dtype=image_dtype)).shape[1]
            chans = _channels(channels, n_out, name)
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            image = _param.Image(len(chans) * samples, size, param, decorrelate, gen, device, image_dtype)
            opt = torch.optim.Adam(image.parameters(), lr=lr)
            ch = torch.tensor(chans, device=device).repeat_interleave(samples)
            history = torch.empty(steps, len(chans), dtype=torch.float64)
            it = range(steps)
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(it, desc=f"visualise {name}", unit="step")
            for s in it:
                with torch.enable_grad():
                    img = image()
                    t = img
                    if transforms == "standard":
                        t = _param.standard_transform(img, gen)
                    elif callable(transforms):
                        t = transforms(img, gen)
                    acts = run(t)
                    obj = _objective(objective, acts, ch, name)
                    loss = -obj
                    if diversity > 0:
                        loss = loss - diversity * _diversity(acts, samples)
                    if tv > 0:
                        loss = loss + tv * _param.total_variation(img)
                    if l2 > 0:
                        loss = loss + l2 * (img - 0.5).pow(2).flatten(1).mean(1)
                    if not bool(torch.isfinite(obj).all()):
                        raise ValueError(f"objective of layer {name!r} became non-finite at step {s}; lower lr"
                                         + (f" (or run the model in float32: its {dtype} activations may overflow)"
                                            if dtype in _LOW else ""))
                    opt.zero_grad(set_to_none=True)
                    loss.sum().backward()
                    opt.step()
                history[s] = obj.detach().double().view(len(chans), samples).mean(1).cpu()
            with torch.no_grad():
                img = image()
                final = _objective(objective, run(img), ch, name).double().cpu()
                if in_ch == 1:
                    img = img.mean(1, keepdim=True).expand(-1, 3, -1, -1)
                img = img.detach().float().cpu().contiguous()
        finally:
            handle.remove()
            for p, f in flags:
                p.requires_grad_(f)
            model.train(was_training)
    if samples > 1:
        img = img.view(len(chans), samples, 3, size, size)
        final = final.view(len(chans), samples)
    return Visualization(name, chans, img, final, history)


def _channels(channels, n: int, layer: str) -> list[int]:
    if channels is None:
        return list(range(n))
    lst = [channels] if isinstance(channels, int) else list(channels)
    if not lst:
        raise ValueError("channels is empty; pass None for all channels")
    for c in lst:
        if not isinstance(c, int) or isinstance(c, bool):
            raise TypeError(f"channels must be ints, got {type(c).__name__}")
        if not 0 <= c < n:
            raise ValueError(f"channel {c} is out of range: layer {layer!r} has {n} channels (0..{n - 1})")
    return lst

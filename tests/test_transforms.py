"""hierfast.transforms: known answers per transform, determinism under a seed, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import hierfast.transforms as T

IMAGE = [lambda: T.Translate(2), lambda: T.Translate(1.5, mode="zeros"), lambda: T.Rotate(20),
         lambda: T.Scale(0.2), lambda: T.HorizontalFlip(0.5), lambda: T.Brightness(0.3),
         lambda: T.Contrast(0.3), lambda: T.GaussianNoise(0.1), lambda: T.Cutout(3)]


def _img(n=6, c=3, h=9, w=11, seed=1, dtype=torch.float32):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("make", IMAGE)
def test_seeded_and_two_draws_differ(make):
    x = _img()
    t1, t2 = make(), make()
    a, b = t1(x), t1(x)
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, t2(x))            # same seed, same first draw
    assert not torch.equal(a, b)                    # T and T' are independent draws
    torch.testing.assert_close(t1.reset()(x), a)    # reset repeats the stream
    g = torch.Generator().manual_seed(5)
    torch.testing.assert_close(make()(x, generator=g), make()(x, generator=torch.Generator().manual_seed(5)))


def test_circular_translate_is_a_roll():
    x = _img(n=20)
    y = T.Translate(3)(x)
    shifts = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)]
    seen = set()
    for i in range(20):
        hits = [s for s in shifts if torch.equal(torch.roll(x[i], s, dims=(1, 2)), y[i])]
        assert hits, f"sample {i} is not a circular shift of at most 3 pixels"
        seen.add(hits[0])
    assert len(seen) > 3
    torch.testing.assert_close(T.Translate(0)(x), x, rtol=0, atol=0)


def test_zero_padded_translate():
    x = _img(n=4, h=8, w=8, dtype=torch.float64)
    torch.testing.assert_close(T.Translate(0, mode="zeros")(x), x, rtol=0, atol=1e-12)
    y = T.Translate(2, mode="zeros")(x)
    # mass is lost at the border, never created: the zero frame of a padded image is kept clean
    z = F.pad(x[:, :, 2:-2, 2:-2], (2, 2, 2, 2))
    yz = T.Translate(2, mode="zeros")(z)
    assert yz.abs().sum() <= z.abs().sum() + 1e-9
    assert not torch.allclose(y, x)


def test_rotation_of_a_radial_blob_and_identity():
    n, s = 5, 33
    r = torch.arange(s, dtype=torch.float64) - (s - 1) / 2
    blob = torch.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / 200.0).expand(n, 1, s, s).contiguous()
    disk = (r[:, None] ** 2 + r[None, :] ** 2) < 15 ** 2  # corners rotate out of the image
    torch.testing.assert_close(T.Rotate(90)(blob)[..., disk], blob[..., disk], rtol=0, atol=5e-3)
    x = _img(dtype=torch.float64)
    torch.testing.assert_close(T.Rotate(0)(x), x, rtol=0, atol=1e-12)
    assert not torch.allclose(T.Rotate(45)(x), x)


def test_scale_identity_and_interior():
    x = _img(dtype=torch.float64)
    torch.testing.assert_close(T.Scale(0)(x), x, rtol=0, atol=1e-12)
    c = torch.full((3, 1, 16, 16), 2.0, dtype=torch.float64)
    y = T.Scale(0.5)(c)
    torch.testing.assert_close(y[:, :, 7:9, 7:9], c[:, :, 7:9, 7:9])  # the centre stays inside the image


def test_flip():
    x = _img(n=40)
    torch.testing.assert_close(T.HorizontalFlip(1.0)(x), x.flip(-1))
    torch.testing.assert_close(T.HorizontalFlip(0.0)(x), x)
    y = T.HorizontalFlip(0.5)(x)
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(40)]
    assert all(f or torch.equal(y[i], x[i]) for i, f in enumerate(flipped)) and 5 < sum(flipped) < 35


def test_brightness_contrast_noise():
    x = _img(n=50, dtype=torch.float64)
    d = T.Brightness(0.4)(x) - x
    off = d.flatten(1)
    torch.testing.assert_close(off, off[:, :1].expand_as(off))
    assert off.abs().max() <= 0.4 and off[:, 0].std() > 0.1
    y = T.Contrast(0.5)(x)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)))
    ratio = (y - y.mean(dim=(1, 2, 3), keepdim=True)).flatten(1).norm(dim=1) / \
        (x - x.mean(dim=(1, 2, 3), keepdim=True)).flatten(1).norm(dim=1)
    assert ratio.min() >= 0.5 - 1e-12 and ratio.max() <= 1.5 + 1e-12
    e = T.GaussianNoise(0.3)(x) - x
    assert e.std().item() == pytest.approx(0.3, rel=0.03) and abs(e.mean().item()) < 0.01


def test_blur_matches_float64_reference():
    x = _img(n=2, c=2, h=12, w=10, dtype=torch.float64)
    sigma = 1.3
    y = T.GaussianBlur(sigma)(x)
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k1 = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(k1, k1) / k1.sum() ** 2
    xp = F.pad(x, (r, r, r, r), mode="reflect")
    ref = torch.stack([F.conv2d(xp[:, c:c + 1], k2[None, None])[:, 0] for c in range(2)], dim=1)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(T.GaussianBlur(0)(x), x)
    const = torch.full((1, 1, 9, 9), 3.0, dtype=torch.float64)
    torch.testing.assert_close(T.GaussianBlur(1.0)(const), const)


def test_cutout():
    x = _img(n=30, h=12, w=12).abs() + 1.0  # no zeros before the cutout
    y = T.Cutout(4)(x)
    zeros = (y == 0).all(dim=1).flatten(1).sum(dim=1)
    assert zeros.max() == 16 and zeros.min() >= 4  # a 4x4 square, clipped at most to 2x2 at a corner
    assert torch.equal(y[y != 0], x[y != 0])
    assert torch.equal(T.Cutout(0)(x), x)


def test_token_mask_and_dropout_and_shuffle():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(5, 100, (8, 30), generator=g)
    x[:, 25:] = 0  # right padding
    m = T.TokenMask(0.3, mask_token_id=1, pad_token_id=0)(x)
    assert torch.equal(m[:, 25:], x[:, 25:]) and ((m == 1) | (m == x)).all()
    assert 0.15 < (m[:, :25] == 1).float().mean() < 0.45
    assert torch.equal(T.TokenMask(1.0, mask_token_id=1)(x), torch.ones_like(x))
    d = T.TokenDropout(0.4, pad_token_id=0)(x)
    for i in range(8):
        kept = d[i][d[i] != 0].tolist()
        it = iter(x[i].tolist())
        assert all(tok in it for tok in kept)  # survivors are an ordered subsequence
        assert 0 < len(kept) < 25
    assert torch.equal(T.TokenDropout(0.0, pad_token_id=0)(x), x)
    s = T.LocalShuffle(3, pad_token_id=0)(x)
    assert torch.equal(s[:, 25:], x[:, 25:]) and not torch.equal(s, x)
    for i in range(8):
        assert sorted(s[i].tolist()) == sorted(x[i].tolist())
        for j, tok in enumerate(x[i, :25].tolist()):  # each token moved fewer than 3 places
            assert tok in s[i, max(0, j - 2):j + 3].tolist()
    assert torch.equal(T.LocalShuffle(1)(x), x)


def test_lambda_and_sweep():
    x = _img()
    t = T.as_transform(lambda v: v * 2)
    torch.testing.assert_close(t(x), 2 * x)
    noisy = T.Lambda(lambda v, g: v + torch.randn(v.shape, generator=g), takes_generator=True, seed=3)
    torch.testing.assert_close(noisy(x), T.Lambda(lambda v, g: v + torch.randn(v.shape, generator=g),
                                                  takes_generator=True, seed=3)(x))
    curve = T.sweep(T.Rotate, [0, 10, 20], seed=1)
    assert [c.magnitude for c in curve] == [0, 10, 20] and all(c.seed == 1 for c in curve)
    with pytest.raises(ValueError, match="batch size"):
        T.as_transform(lambda v: v[:1])(x)
    with pytest.raises(TypeError, match="callable"):
        T.as_transform(3)


@pytest.mark.parametrize("bad, match", [
    (lambda: T.Rotate(-1), "magnitude"), (lambda: T.Scale(1.0), "magnitude"),
    (lambda: T.HorizontalFlip(1.5), "probability"), (lambda: T.Contrast(2), "magnitude"),
    (lambda: T.GaussianNoise(float("nan")), "magnitude"), (lambda: T.Translate(1.5), "integer"),
    (lambda: T.Translate(1, mode="reflect"), "mode"), (lambda: T.Cutout(2.5), "whole"),
    (lambda: T.TokenMask(0.5, mask_token_id=1.0), "mask_token_id"),
    (lambda: T.TokenDropout(0.1, pad_token_id=None), "pad_token_id"), (lambda: T.Rotate("3"), "number"),
])
def test_bad_magnitudes(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        T.Rotate(3)(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="floating"):
        T.Rotate(3)(torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, L\)"):
        T.TokenMask(0.1, mask_token_id=0)(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        T.LocalShuffle(2)(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="larger"):
        T.Cutout(20)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="sigma"):
        T.GaussianBlur(3)(torch.zeros(1, 1, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_own_stream():
    x = _img().cuda()
    for make in IMAGE:
        a, b = make()(x), make()(x)
        assert a.device == x.device
        torch.testing.assert_close(a, b)


def test_deterministic_declarations_and_the_scoring_rule():
    from hierfast.transforms._base import scored_two_view

    assert T.GaussianBlur(1.0).deterministic and not scored_two_view(T.GaussianBlur(1.0))
    x = _img()
    assert torch.equal(T.GaussianBlur(1.0)(x), T.GaussianBlur(1.0)(x))  # the declaration holds
    for t in (T.HorizontalFlip(0.5), T.Translate(1), T.GaussianNoise(0.1), T.Rotate(5)):
        assert not t.deterministic and scored_two_view(t)
    assert scored_two_view(T.Lambda(lambda v: v.flip(-1)))  # undeclared callables count as random
    assert not scored_two_view(T.Lambda(lambda v: v.flip(-1), deterministic=True))
    with pytest.raises(TypeError, match="deterministic"):
        T.Lambda(lambda v: v, deterministic=1)


def test_deterministic_when_the_draw_cannot_vary():
    """A flip (or mask / deletion) with probability 0 or 1, and any transform at its identity
    magnitude, gives T = T' on every call: scored one-view, read per instance."""
    from hierfast.transforms._base import scored_two_view
    from hierfast.transforms.sequence import SequenceTransform

    x = _img()
    fixed = [T.HorizontalFlip(0.0), T.HorizontalFlip(1.0), T.TokenMask(1.0, mask_token_id=9),
             T.TokenDropout(1.0, pad_token_id=0), T.LocalShuffle(1.0), T.Translate(0), T.Rotate(0), T.Scale(0),
             T.Brightness(0), T.Contrast(0), T.GaussianNoise(0), T.Cutout(0), T.GaussianBlur(0.0)]
    for t in fixed:
        assert t.deterministic and not scored_two_view(t), t
    toks = torch.arange(1, 25).view(3, 8)
    for t in fixed:
        v = toks if isinstance(t, SequenceTransform) else x
        assert torch.equal(t(v), t(v)), t  # the declaration holds
    torch.testing.assert_close(T.HorizontalFlip(1.0)(x), x.flip(-1), rtol=0, atol=0)
    for t in (T.HorizontalFlip(0.5), T.TokenMask(0.5, mask_token_id=9), T.TokenDropout(0.5, pad_token_id=0),
              T.LocalShuffle(1.5), T.Cutout(1)):
        assert not t.deterministic and scored_two_view(t), t


FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ZERO = [lambda: T.Translate(0), lambda: T.Translate(0, mode="zeros"), lambda: T.Rotate(0), lambda: T.Scale(0),
        lambda: T.HorizontalFlip(0), lambda: T.Brightness(0), lambda: T.Contrast(0), lambda: T.GaussianNoise(0),
        lambda: T.GaussianBlur(0), lambda: T.Cutout(0)]


@pytest.mark.parametrize("make", ZERO)
@pytest.mark.parametrize("dtype", FLOATS)
def test_magnitude_zero_is_exactly_the_identity(make, dtype):
    x = _img(dtype=dtype)
    y = make()(x)
    assert y.dtype == dtype and torch.equal(y, x)
    assert y.data_ptr() != x.data_ptr()  # a copy, never the caller's tensor


@pytest.mark.parametrize("make", [lambda: T.Rotate(15, seed=3), lambda: T.Scale(0.3, seed=3),
                                  lambda: T.Translate(1.5, mode="zeros", seed=3)])
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_resampling_half_precision_matches_float32(make, dtype):
    """Reference: the same draw on the float32 copy of the (already rounded) input, rounded once."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = make()(x)
    ref = make()(x.float())
    assert y.dtype == dtype and not y.isnan().any()
    torch.testing.assert_close(y, ref.to(dtype), rtol=0, atol=0)


def test_resampling_float64_runs_in_float64():
    """Zoom 1/2 about the centre of a linear ramp is linear again: exact to float64 rounding."""
    w = 16
    ramp = torch.arange(w, dtype=torch.float64).expand(1, 1, w, w).contiguous()
    g = torch.Generator().manual_seed(0)
    inv = float(1.0 / (torch.rand(1, generator=g) * 1.0 + 0.5))  # 1/zoom, zoom ~ U[0.5, 1.5) (float32 draw)
    y = T.Scale(0.5, seed=0)(ramp)[0, 0]
    c = (w - 1) / 2
    expect = c + (torch.arange(w, dtype=torch.float64) - c) * inv
    inside = (expect >= 0) & (expect <= w - 1)
    torch.testing.assert_close(y[4, inside], expect[inside], rtol=0, atol=1e-9)


def test_token_dropout_keeps_pads_in_place():
    p = 0
    left = torch.tensor([[p, p, 101, 5, 6, 7, 102], [p, p, p, 101, 8, 9, 102]])
    mid = torch.tensor([[5, p, 6, 7, p, 8, 9]])
    for x in (left, mid):
        assert torch.equal(T.TokenDropout(0.0, pad_token_id=p)(x), x)
        for seed in range(5):
            y = T.TokenDropout(0.5, pad_token_id=p, seed=seed)(x)
            g = torch.Generator().manual_seed(seed)
            keep = (torch.rand(x.shape, generator=g) >= 0.5) & (x != p)
            for row, out, k in zip(x, y, keep):
                slots = (row != p).nonzero().flatten()
                assert (out[row == p] == p).all()  # original pads untouched
                # reference: survivors in order, then pad, written to the non-pad slots
                survivors = row[k].tolist()
                expect = survivors + [p] * (len(slots) - len(survivors))
                assert out[slots].tolist() == expect


def test_a_samples_draw_does_not_depend_on_batch_size_or_dtype():
    x = _img(n=4, dtype=torch.float64)
    for make in (lambda: T.Translate(3, mode="zeros", seed=1), lambda: T.Translate(3, seed=1),
                 lambda: T.Cutout(3, seed=1), lambda: T.Rotate(20, seed=1), lambda: T.Brightness(0.5, seed=1)):
        torch.testing.assert_close(make()(x)[:2], make()(x[:2]), rtol=0, atol=1e-12)
    for n, shape in ((5, (3, 5, 7)), (3, (1, 2, 2)), (17, (1, 1, 3))):  # numel % 16 != 0: randn's tail redraw
        z = torch.zeros(n, *shape)
        reference = torch.stack([T.GaussianNoise(1.0, seed=2)(z)[i] for i in range(n)])
        for m in range(1, n + 1):
            torch.testing.assert_close(T.GaussianNoise(1.0, seed=2)(z[:m]), reference[:m], rtol=0, atol=0)
    z = torch.zeros(4, 1, 2, 2)
    for make in (lambda: T.Brightness(1.0, seed=0), lambda: T.GaussianNoise(1.0, seed=0)):
        torch.testing.assert_close(make()(z.double()), make()(z).double(), rtol=0, atol=0)
    ones = torch.ones(4, 1, 5, 5)
    c32, c64 = T.Contrast(1.0, seed=0)(ones + torch.eye(5)), T.Contrast(1.0, seed=0)((ones + torch.eye(5)).double())
    torch.testing.assert_close(c64.float(), c32, rtol=1e-6, atol=1e-6)


def test_a_subclass_may_declare_deterministic():
    class Fixed(T.GaussianNoise):
        def __init__(self):
            super().__init__(0.5)
            self.deterministic = True  # was: AttributeError (a property without a setter)

    t = Fixed()
    assert t.deterministic and not T.GaussianNoise(0.5).deterministic and T.GaussianNoise(0.0).deterministic
    t.deterministic = False
    assert not t.deterministic
    with pytest.raises(TypeError, match="True or False"):
        t.deterministic = 1

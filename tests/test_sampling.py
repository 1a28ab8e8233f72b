"Crop samplers (matseg.sampling): class shares against an exact calculation, seeds, resume, uniform == CropSampler."
import io
import math

import numpy as np
import pytest
import torch

from matseg.core import MatsegError
from matseg.sampling import (ClassCropSampler, UniformSampler, class_pixel_counts, expected_crop_share, make_sampler,
                             rare_class_probs)
from matseg.train import CropSampler, get_rng_state, set_rng_state

N_DRAWS = 10_000


def cracked(n=4, size=48, seed=0):
    "Images with a large 'oxide' band (1), thin rare 'cracks' (2, ~1 % of pixels) and an unlabelled border row (255)."
    g = np.random.default_rng(seed)
    m = np.zeros((n, size, size), np.uint8)
    m[:, :, size // 2:] = 1
    for i in range(n):
        if i == n - 1: continue  # one image without cracks
        r, c = g.integers(4, size - 4, 2)
        m[i, r, max(0, c - 3):c + 3] = 2
    m[:, 0, :] = 255
    x = torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return x, torch.from_numpy(m)


def share(sampler, K):
    "Share of drawn crops that contain each class, counted on the crops the sampler yields."
    hits, n = np.zeros(K), 0
    for _, yb in sampler:
        hits += np.array([(yb == k).flatten(1).any(1).sum().item() for k in range(K)]); n += len(yb)
    return hits / n, n


def brute_share(masks, s, probs, ignore=255):
    "Independent oracle: loop over every centre pixel of each class, clamp the window, look for each class."
    m = masks.numpy(); N, H, W = m.shape; K = len(probs); out = np.zeros(K)
    for c in range(K):
        pts = np.argwhere(m == c)
        if probs[c] == 0 or not len(pts): continue
        acc = np.zeros(K)
        for i, y, x in pts:
            y0, x0 = min(max(y - s // 2, 0), H - s), min(max(x - s // 2, 0), W - s)
            win = m[i, y0:y0 + s, x0:x0 + s]
            acc += [(win == k).any() for k in range(K)]
        out += probs[c] * acc / len(pts)
    return out


def test_exact_share_matches_brute_force():
    x, y = cracked(n=2, size=24)
    for T in (0.1, 0.5, 5.0):
        cnt = class_pixel_counts(y, 3, 255)
        p = rare_class_probs(cnt.double() / cnt.sum(), T).numpy()
        assert np.allclose(expected_crop_share(y, 8, p, 255, 3), brute_share(y, 8, p))
    # uniform: mean over every corner, by a loop
    m = y.numpy(); s = 8
    want = np.mean([[(m[i, a:a + s, b:b + s] == k).any() for k in range(3)]
                    for i in range(2) for a in range(24 - s + 1) for b in range(24 - s + 1)], axis=0)
    assert np.allclose(expected_crop_share(y, s, None, 255, 3), want)


@pytest.mark.parametrize("name,T", [("rare_class", 0.1), ("rare_class", 1.0), ("adaptive", 0.3), ("uniform", 0.1)])
def test_share_within_2_percent_of_target_over_10000_draws(name, T):
    x, y = cracked()
    s = make_sampler(name, x, y, 16, 500, seed=7, crops_per_image=N_DRAWS // len(x), n_classes=3, ignore_index=255,
                     temperature=T)
    if name == "adaptive":
        s.update([0.95, 0.2, 0.6])  # a hard oxide class: the draw shifts towards it
        assert s.probabilities()[1] > rare_class_probs(s.freq, T)[1]
    probs = None if name == "uniform" else s.probabilities().numpy()
    target = expected_crop_share(y, 16, probs, 255, 3)
    got, n = share(s, 3)
    assert n == N_DRAWS
    assert np.abs(got - target).max() < 0.02, (got, target)
    if name != "uniform":  # the drawn class is always in the crop, so the share is at least its probability
        assert np.all(got >= probs - 0.02)


def test_rare_class_sees_cracks_more_than_uniform():
    x, y = cracked()
    u = expected_crop_share(y, 16, None, 255, 3)[2]
    cnt = class_pixel_counts(y, 3, 255)
    r = expected_crop_share(y, 16, rare_class_probs(cnt.double() / cnt.sum(), 0.1).numpy(), 255, 3)[2]
    assert r > 0.9 > u


def test_centres_never_ignored_and_drawn_class_in_crop():
    x, y = cracked()
    s = ClassCropSampler(x, y, 16, 64, seed=0, crops_per_image=300, n_classes=3, ignore_index=255, temperature=1.0)
    d = s.draw()
    centre = y[d["image"], d["centre"][:, 0], d["centre"][:, 1]].long()
    assert torch.equal(centre, d["class"]) and not bool((centre == 255).any())
    for k in range(len(d["class"])):
        i, a, b = int(d["image"][k]), int(d["y"][k]), int(d["x"][k])
        assert bool((y[i, a:a + 16, b:b + 16] == d["class"][k]).any())
    # the empirical class frequencies follow p_c
    freq = torch.bincount(d["class"], minlength=3).double() / len(d["class"])
    assert torch.allclose(freq, s.probabilities(), atol=0.03)


def test_fixed_seed_same_crops_other_seed_different():
    x, y = cracked()
    for name in ("uniform", "rare_class", "adaptive"):
        a, b, c = (torch.cat([xb for xb, _ in make_sampler(name, x, y, 16, 8, seed=sd, crops_per_image=6, n_classes=3,
                                                               ignore_index=255)]) for sd in (1, 1, 2))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_uniform_is_cropsampler_exactly():
    x, y = cracked()
    for aug in (True, False):
        ref = list(CropSampler(x, y, 16, 5, seed=3, crops_per_image=7, augment=aug))
        uni = list(UniformSampler(x, y, 16, 5, seed=3, crops_per_image=7, augment=aug, n_classes=3, temperature=2.0))
        assert len(ref) == len(uni)
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ref, uni))


@pytest.mark.parametrize("name", ["uniform", "rare_class", "adaptive"])
def test_resume_from_saved_state_continues_identically(name):
    x, y = cracked()
    kw = dict(crops_per_image=5, n_classes=3, ignore_index=255, temperature=0.2)
    a = make_sampler(name, x, y, 16, 4, seed=11, **kw)
    list(a); a.update([0.9, 0.5, 0.0])
    buf = io.BytesIO(); torch.save({"sampler": a.state_dict(), "rng": get_rng_state(a.gen)}, buf); buf.seek(0)
    want = [torch.cat([xb for xb, _ in a]) for _ in range(2)]
    a.update([0.9, 0.9, 0.9]); want.append(torch.cat([xb for xb, _ in a]))
    st = torch.load(buf, weights_only=True)  # what train_job's state.pt allows
    b = make_sampler(name, x, y, 16, 4, seed=0, **kw)
    b.load_state_dict(st["sampler"])
    got = [torch.cat([xb for xb, _ in b]) for _ in range(2)]
    b.update([0.9, 0.9, 0.9]); got.append(torch.cat([xb for xb, _ in b]))
    assert all(torch.equal(p, q) for p, q in zip(want, got))
    if name != "adaptive":  # these carry no state beyond the generator: the RNG helpers of matseg.train resume them
        c = make_sampler(name, x, y, 16, 4, seed=0, **kw); set_rng_state(st["rng"], c.gen)
        assert torch.equal(torch.cat([xb for xb, _ in c]), want[0])


def test_adaptive_difficulty_formula():
    x, y = cracked()
    s = make_sampler("adaptive", x, y, 16, 4, n_classes=3, ignore_index=255, temperature=0.5, momentum=0.5, floor=0.05)
    assert torch.allclose(s.probabilities(), rare_class_probs(s.freq, 0.5))  # before any validation: rare_class
    s.update([1.0, 0.5, math.nan]); s.update([1.0, 0.0, 0.2])
    d = np.array([0.5 * (0.5 * 1 + 0.5 * 0) + 0.5 * 0, 0.5 * (0.5 + 0.5 * 0.5) + 0.5 * 1, 0.5 * 1 + 0.5 * 0.8])
    assert np.allclose(s.difficulty.numpy(), d)
    f = s.freq.numpy(); w = np.exp((1 - f) / 0.5) * (0.05 + d)
    assert np.allclose(s.probabilities().numpy(), w / w.sum())
    r = make_sampler("rare_class", x, y, 16, 4, n_classes=3, ignore_index=255, temperature=0.5)
    r.update([0.0, 0.0, 0.0]); assert torch.allclose(r.probabilities(), rare_class_probs(r.freq, 0.5))


def test_bad_inputs_refused():
    x, y = cracked()
    with pytest.raises(MatsegError, match="uniform, rare_class, adaptive"): make_sampler("rare", x, y, 16, 4)
    for t in (0, -0.1, math.inf, math.nan):
        with pytest.raises(MatsegError, match="sampling_temperature"): make_sampler("rare_class", x, y, 16, 4, temperature=t)
    with pytest.raises(MatsegError, match="label 255"): make_sampler("rare_class", x, y, 16, 4, n_classes=3)
    with pytest.raises(MatsegError, match="no labelled pixel"):
        make_sampler("adaptive", x, torch.full_like(y, 255), 16, 4, n_classes=3, ignore_index=255)
    s = make_sampler("adaptive", x, y, 16, 4, n_classes=3, ignore_index=255)
    with pytest.raises(MatsegError, match="3 classes"): s.update([0.5])
    with pytest.raises(MatsegError, match=r"\[0, 1\]"): s.update([0.5, math.inf, 0.1])

"Synthetic generators: determinism, exact masks, requested porosity, shapes/dtypes, files on disk."
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from matseg.core import MatsegError
from matseg.synth import (AFM_CHANNELS, GENERATORS, WRITERS, make_afm_image, make_synthetic, make_xct_volume,
                          write_afm_dataset, write_synthetic, write_xct_dataset)

SHAPE = (12, 48, 48)


# ---------------------------------------------------------------- XCT

@pytest.mark.parametrize("generator", ["blobs", "spheres"])
def test_xct_deterministic_per_seed(generator):
    v1, m1 = make_xct_volume(SHAPE, seed=4, generator=generator)
    v2, m2 = make_xct_volume(SHAPE, seed=4, generator=generator)
    v3, m3 = make_xct_volume(SHAPE, seed=5, generator=generator)
    assert np.array_equal(v1, v2) and np.array_equal(m1, m2)
    assert not np.array_equal(m1, m3) and not np.array_equal(v1, v3)


def test_xct_leaves_global_numpy_rng_alone():
    np.random.seed(123); expected = np.random.random(3)
    np.random.seed(123); make_xct_volume(SHAPE, seed=1); got = np.random.random(3)
    assert np.array_equal(expected, got)


@pytest.mark.parametrize("porosity", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("generator,tol", [("blobs", 0.002), ("spheres", 0.015)])
def test_xct_porosity(porosity, generator, tol):
    _, m = make_xct_volume((16, 64, 64), porosity=porosity, seed=0, generator=generator)
    assert abs((m > 0).mean() - porosity) <= tol


def test_xct_classes_and_grey_levels():
    v, m = make_xct_volume((16, 64, 64), porosity=0.15, seed=2, pits=True, noise=0.0, blur=0.0, beam_hardening=0.0)
    assert set(np.unique(m)) == {0, 1, 2}
    # noise-free, blur-free: grey level is a function of the class (pore = pit = air), up to the slice drift
    assert v[m == 0].min() > v[m > 0].max()
    # pits are exactly the pore clusters that touch the y = 0 face
    lab, _ = ndimage.label(m > 0)
    touching = set(np.unique(lab[:, 0, :])) - {0}
    assert all((m[lab == lbl] == 2).all() == (lbl in touching) for lbl in range(1, lab.max() + 1))
    assert (m[:, 0, :][m[:, 0, :] > 0] == 2).all()
    # without pits, only classes 0 and 1
    assert set(np.unique(make_xct_volume((16, 64, 64), porosity=0.15, seed=2)[1])) == {0, 1}


def test_xct_realism_and_dtypes():
    v, m = make_xct_volume(SHAPE, seed=0)
    assert v.shape == m.shape == SHAPE and v.dtype == np.float32 and m.dtype == np.uint8
    assert 0 <= v.min() and v.max() <= 1
    assert v[m == 0].mean() > v[m == 1].mean() + 0.2  # solid brighter than pores, even with blur and noise
    # beam-hardening cupping: solid darker in the centre of the slice than near the corners
    vc, mc = make_xct_volume((8, 64, 64), seed=0, noise=0, blur=0, beam_hardening=0.3)
    yy, xx = np.mgrid[:64, :64]; r = np.hypot(yy - 31.5, xx - 31.5)
    solid = mc == 0
    assert vc[:, r < 10][solid[:, r < 10]].mean() < vc[:, r > 35][solid[:, r > 35]].mean() - 0.1
    v16, m16 = make_xct_volume(SHAPE, seed=0, dtype="uint16")
    assert v16.dtype == np.uint16 and v16.max() > 30000 and np.array_equal(m16, m)


def test_xct_bad_input():
    with pytest.raises(MatsegError, match="porosity"): make_xct_volume(SHAPE, porosity=1.2)
    with pytest.raises(MatsegError, match="'blobs' or 'spheres'"): make_xct_volume(SHAPE, generator="cubes")
    with pytest.raises(MatsegError, match="3 dimensions"): make_xct_volume((64, 64))


# ---------------------------------------------------------------- AFM

def test_afm_deterministic_shapes_dtypes():
    img, mask = make_afm_image(64, n_grains=12, seed=7)
    img2, mask2 = make_afm_image(64, n_grains=12, seed=7)
    assert np.array_equal(img, img2) and np.array_equal(mask, mask2)
    assert not np.array_equal(mask, make_afm_image(64, n_grains=12, seed=8)[1])
    assert img.shape == (3, 64, 64) and img.dtype == np.float32 and mask.shape == (64, 64) and mask.dtype == np.uint8
    assert np.isfinite(img).all()
    assert make_afm_image((40, 56), seed=0)[0].shape == (3, 40, 56)


def test_afm_mask_matches_brute_force_voronoi():
    "Independent oracle: nearest-seed labels and point-to-bisector distances computed over all seeds."
    size, n, width, seed = 64, 15, 3.0, 11
    img, mask = make_afm_image(size, n_grains=n, seed=seed, boundary_width=width)
    seeds = np.random.default_rng(seed).uniform((0, 0), (size, size), (n, 2))  # same draw as the generator
    pts = np.stack(np.mgrid[:size, :size], -1).reshape(-1, 2).astype(float)
    D = np.linalg.norm(pts[:, None] - seeds[None], axis=-1)
    near = D.argmin(1)
    gap = np.linalg.norm(seeds[near][:, None] - seeds[None], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bis = (D ** 2 - D.min(1, keepdims=True) ** 2) / (2 * gap)
    bis[np.arange(len(pts)), near] = np.inf
    expected = (bis.min(1) < width / 2).reshape(size, size)
    assert np.array_equal(mask == 1, expected)
    # every pixel whose 4-neighbour lies in another cell is a boundary pixel (its distance is <= 1 < 1.5)
    lab = near.reshape(size, size)
    change = np.zeros_like(expected)
    change[:-1] |= lab[:-1] != lab[1:]; change[1:] |= lab[1:] != lab[:-1]
    change[:, :-1] |= lab[:, :-1] != lab[:, 1:]; change[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    assert (mask[change] == 1).all()


def test_afm_classes_and_channels():
    img, mask = make_afm_image(96, n_grains=25, seed=1)
    assert set(np.unique(mask)) == {0, 1} and 0.05 < mask.mean() < 0.5
    h, ph, amp = img
    assert ph[mask == 1].mean() > ph[mask == 0].mean() + 2  # phase contrast at boundaries
    assert amp[mask == 1].mean() > amp[mask == 0].mean()  # amplitude ~ slope, steep in grooves
    assert h[mask == 1].mean() < h[mask == 0].mean()  # boundaries are grooves
    _, m3 = make_afm_image(96, n_grains=25, seed=1, amorphous_fraction=0.4)
    assert set(np.unique(m3)) == {0, 1, 2}
    assert np.array_equal(m3 == 1, (mask == 1) & (m3 != 2))  # same geometry, amorphous cells relabelled


def test_afm_fast():
    make_afm_image(128, seed=0)
    t0 = time.perf_counter()
    for i in range(10): make_afm_image(128, seed=i)
    assert (time.perf_counter() - t0) / 10 < 0.25  # ~10 ms on an idle core


def test_afm_bad_input():
    with pytest.raises(MatsegError, match="n_grains"): make_afm_image(64, n_grains=1)
    with pytest.raises(MatsegError, match="8×8"): make_afm_image(4)


# ---------------------------------------------------------------- registry

def test_registry():
    assert set(GENERATORS) == set(WRITERS) == {"xct", "afm"}
    v, m = make_synthetic("xct", shape=SHAPE, seed=3)
    assert np.array_equal(m, make_xct_volume(SHAPE, seed=3)[1])
    with pytest.raises(MatsegError, match="valid names: afm, xct"): make_synthetic("sem")
    with pytest.raises(MatsegError, match="valid names: afm, xct"): write_synthetic("sem", "/tmp/x")


# ---------------------------------------------------------------- writers

def _validate_spec(d):
    spec = json.loads((d / "dataset.json").read_text())
    try:
        from matseg.profile import DatasetSpec
    except ImportError:  # profile module not built yet
        return spec
    DatasetSpec.model_validate(spec)
    return spec


@pytest.mark.parametrize("fmt", ["tif", "npy"])
def test_write_xct_dataset(tmp_path, fmt):
    d = write_xct_dataset(tmp_path / "xct", fmt=fmt, shape=SHAPE, porosity=0.2, seed=6, pits=True)
    v, m = make_xct_volume(SHAPE, porosity=0.2, seed=6, pits=True, dtype="uint16")
    read = tifffile.imread if fmt == "tif" else np.load
    assert np.array_equal(read(d / f"volume.{fmt}"), v) and np.array_equal(read(d / f"mask.{fmt}"), m)
    if fmt == "tif":
        assert len(tifffile.TiffFile(d / "volume.tif").pages) == SHAPE[0]
    spec = _validate_spec(d)
    assert spec["layout"] == {"kind": "volume", "volume_image": f"volume.{fmt}", "volume_mask": f"mask.{fmt}", "axis": 0}
    assert spec["classes"] == ["solid", "pore", "surface_pit"] and spec["modality"] == "XCT"
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_write_afm_split_folders_one_file(tmp_path):
    d = write_afm_dataset(tmp_path / "afm", n_images=10, size=32, seed=3)
    counts = {s: len(list((d / s).glob("*.tif"))) for s in ("train", "val", "test")}
    assert counts == {"train": 6, "val": 2, "test": 2}
    for s in counts:
        for f in (d / s).glob("*.tif"):
            i = int(f.stem.split("_")[1])
            img, mask = make_afm_image(32, seed=3 + i)
            assert np.array_equal(tifffile.imread(f), img)
            png = Image.open(d / f"{s}_annot" / f"{f.stem}.png")
            assert png.mode == "L" and np.array_equal(np.asarray(png), mask)
    spec = _validate_spec(d)
    assert spec["channels"] == list(AFM_CHANNELS) and spec["classes"] == ["grain", "boundary"]
    assert spec["layout"]["splits"]["val"] == {"images": "val", "masks": "val_annot"}


def test_write_afm_flat_separate_channels(tmp_path):
    d = write_afm_dataset(tmp_path / "afm", n_images=2, size=32, split_folders=False, separate_channel_files=True,
                          amorphous_fraction=0.3)
    img, mask = make_afm_image(32, seed=1, amorphous_fraction=0.3)
    for c, plane in zip(AFM_CHANNELS, img):
        assert np.array_equal(tifffile.imread(d / "images" / f"afm_001_{c}.tif"), plane)
    assert np.array_equal(np.asarray(Image.open(d / "masks/afm_001.png")), mask)
    spec = _validate_spec(d)
    assert spec["layout"]["kind"] == "flat" and spec["layout"]["channel_suffixes"]["phase"] == "_phase"
    assert spec["classes"] == ["grain", "boundary", "amorphous"]
    with pytest.raises(MatsegError, match="at least 3 images"):
        write_afm_dataset(tmp_path / "few", n_images=2)

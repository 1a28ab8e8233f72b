"""Data layer: readers, mask decoding, pairing, splits, bad-input errors, normalisation, tiling, summaries, real data."""
import json
import logging
import time
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import REPO, run_matseg
from matseg.core import MatsegError, asset_path
from matseg.data import (Sample, check_finite, class_fraction, decode_mask, imagenet_normalize, load_dataset, normalize, pair_files,
                         read_image, read_mask, read_sample, split_counts, stitch, summarize, tile, tile_starts)
from matseg.profile import (BinaryEncoding, DatasetSpec, IndexEncoding, LayoutSpec, NormSpec, PaletteEncoding,
                            load_profile)

SAMPLE = asset_path("sample", "super1")
SUPER1_CLASSES = ["gamma_matrix", "secondary_gamma_prime", "tertiary_gamma_prime"]
SUPER1_PAL = PaletteEncoding(colors={"secondary_gamma_prime": [0, 0, 255], "tertiary_gamma_prime": [255, 0, 0]},
                             default_class="gamma_matrix")
RNG = np.random.default_rng(0)


def spec(root, **kw):
    "A DatasetSpec for a test folder (index masks, 2 classes unless given)."
    layout = kw.pop("layout", {})
    d = dict(name="t", modality="SEM", material="steel", root=str(root), classes=["bg", "fg"], layout=LayoutSpec(**layout))
    d.update(kw)
    return DatasetSpec(**d)


def grey(h=16, w=20, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def write_pair(img_dir, mask_dir, stem, h=16, w=20, seed=0, mask_stem=None, mask_ext=".png", img_ext=".png"):
    "An image whose first pixel encodes `seed` and a 0/1 mask = (image > 127)."
    img_dir.mkdir(parents=True, exist_ok=True); mask_dir.mkdir(parents=True, exist_ok=True)
    g = grey(h, w, seed); g[0, 0] = seed
    Image.fromarray(g).save(img_dir / f"{stem}{img_ext}")
    m = (g > 127).astype(np.uint8)
    p = mask_dir / f"{mask_stem or stem}{mask_ext}"
    if mask_ext == ".tif": tifffile.imwrite(p, m)
    else: Image.fromarray(m).save(p)
    return g, m


def err(f, *a, **kw):
    with pytest.raises(MatsegError) as ei:
        f(*a, **kw)
    return str(ei.value)


# ---------------------------------------------------------------- readers
def test_read_image_formats(tmp_path):
    g = grey()
    Image.fromarray(np.dstack([g] * 3)).save(tmp_path / "rgb_grey.png")
    Image.fromarray(np.dstack([g] * 3 + [np.full_like(g, 255)])).save(tmp_path / "rgba_grey.png")
    Image.fromarray(g).save(tmp_path / "q.jpg", quality=100)
    Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "u16.png")
    tifffile.imwrite(tmp_path / "u16.tif", g.astype(np.uint16) * 257)
    tifffile.imwrite(tmp_path / "f.tif", g.astype(np.float32) / 3)
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([g, 255 - g, g // 2, g // 3]), photometric="minisblack")  # 4 channels
    tifffile.imwrite(tmp_path / "rgb.tif", np.dstack([g, 255 - g, g // 2]), photometric="rgb")
    np.save(tmp_path / "a.npy", np.stack([g, g]).astype(np.float64))
    np.save(tmp_path / "hwc.npy", np.dstack([g, 255 - g, g]))
    p = Image.fromarray(g).convert("P"); p.save(tmp_path / "pal.png")

    assert np.array_equal(read_image(tmp_path / "rgb_grey.png"), g[None])
    assert np.array_equal(read_image(tmp_path / "rgba_grey.png"), g[None])
    assert read_image(tmp_path / "q.jpg").shape == (1, 16, 20)
    for f in ("u16.png", "u16.tif"):
        a = read_image(tmp_path / f)
        assert a.dtype == np.uint16 and np.array_equal(a[0], g.astype(np.uint16) * 257), f
    assert read_image(tmp_path / "f.tif").dtype == np.float32
    assert np.array_equal(read_image(tmp_path / "stack.tif"), np.stack([g, 255 - g, g // 2, g // 3]))
    assert np.array_equal(read_image(tmp_path / "rgb.tif"), np.stack([g, 255 - g, g // 2]))
    assert read_image(tmp_path / "a.npy").shape == (2, 16, 20)
    assert np.array_equal(read_image(tmp_path / "hwc.npy"), np.stack([g, 255 - g, g]))
    assert read_image(tmp_path / "pal.png").shape[1:] == (16, 20)


def test_read_mask_first_page_without_series_warning(tmp_path, caplog):
    # like Super1: an RGBA overlay page followed by a smaller thumbnail page, written as a "shaped" series
    over = np.zeros((32, 32, 4), np.uint8); over[..., 3] = 255; over[:4, :4, 2] = 255
    with tifffile.TiffWriter(tmp_path / "m.tif") as w:
        w.write(over, photometric="rgb", description='{"shape": [32, 32, 3]}', metadata=None)
        w.write(np.zeros((16, 16, 3), np.uint8), photometric="rgb", metadata=None)
    with caplog.at_level(logging.WARNING, logger="tifffile"):
        m = read_mask(tmp_path / "m.tif", rgb=True)
        read_image(tmp_path / "m.tif")
    assert m.shape == (32, 32, 4) and m[0, 0, 2] == 255
    assert not [r for r in caplog.records if "series shape" in r.getMessage()]


def test_corrupt_and_missing_and_unsupported_files(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"II*\x00garbage")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    for f in ("bad.tif", "bad.png"):
        e = err(read_image, tmp_path / f)
        assert f in e and "re-export" in e
    assert "does not exist" in err(read_image, tmp_path / "nope.png")
    assert "unsupported file type '.gif'" in err(read_mask, tmp_path / "x.gif")


# ---------------------------------------------------------------- mask decoding
def test_decode_index_and_errors():
    raw = np.array([[0, 1], [2, 1]], np.uint8)
    assert decode_mask(raw, IndexEncoding(), ["a", "b", "c"]).tolist() == raw.tolist()
    assert decode_mask(np.dstack([raw] * 3), IndexEncoding(), ["a", "b", "c"]).tolist() == raw.tolist()  # grey RGB copy
    e = err(decode_mask, np.array([[0, 5, 5], [255, 1, 1]], np.uint8), IndexEncoding(), ["a", "b"], "x/m#1.png")
    assert "x/m#1.png" in e and "5: 2 px" in e and "255: 1 px" in e and "binary" in e
    e = err(decode_mask, np.dstack([raw, raw * 0, raw]), IndexEncoding(), ["a", "b", "c"], "c.png")
    assert "c.png" in e and "palette" in e


def test_decode_binary():
    raw = np.array([[0, 255, 1], [7, 0, 255]], np.uint8)
    assert decode_mask(raw, BinaryEncoding(), ["bg", "fg"]).tolist() == [[0, 1, 1], [1, 0, 1]]
    assert decode_mask(raw, BinaryEncoding(foreground=255), ["bg", "fg"]).tolist() == [[0, 1, 0], [0, 0, 1]]
    assert decode_mask(raw, {"kind": "binary", "foreground": 7}, ["bg", "fg"]).dtype == np.uint8


def test_decode_palette_default_tolerance_and_unknown_colours():
    h, w = 30, 40
    truth = RNG.integers(0, 3, (h, w)).astype(np.uint8)
    greyval = RNG.integers(0, 256, (h, w)).astype(np.uint8)
    rgb = np.dstack([greyval] * 3 + [np.full_like(greyval, 255)])  # grey overlay, RGBA
    rgb[truth == 1, :3] = [0, 0, 255]; rgb[truth == 2, :3] = [255, 0, 0]
    rgb[truth == 0, :3] = np.where(rgb[truth == 0, :3] == [0, 0, 255], 1, rgb[truth == 0, :3])
    assert np.array_equal(decode_mask(rgb, SUPER1_PAL, SUPER1_CLASSES), truth)
    # oracle: an independent per-pixel python loop on a small image
    oracle = [[1 if tuple(p[:3]) == (0, 0, 255) else 2 if tuple(p[:3]) == (255, 0, 0) else 0 for p in row] for row in rgb]
    assert decode_mask(rgb, SUPER1_PAL, SUPER1_CLASSES).tolist() == oracle
    noisy = rgb.copy(); noisy[0, 0, :3] = [3, 2, 250]
    assert decode_mask(noisy, SUPER1_PAL.model_copy(update={"tolerance": 5}), SUPER1_CLASSES)[0, 0] == 1
    assert decode_mask(noisy, SUPER1_PAL, SUPER1_CLASSES)[0, 0] == 0
    strict = SUPER1_PAL.model_copy(update={"default_class": None})
    pure = np.zeros((4, 4, 3), np.uint8); pure[:2] = [0, 0, 255]; pure[3, 3] = [10, 20, 30]
    e = err(decode_mask, pure, strict, SUPER1_CLASSES, "mask(2).png")
    assert "mask(2).png" in e and "RGB(0, 0, 0): 7 px" in e and "RGB(10, 20, 30): 1 px" in e
    assert "single-channel" in err(decode_mask, truth, SUPER1_PAL, SUPER1_CLASSES, "m.png")


# ---------------------------------------------------------------- pairing and splits
def test_discover_splits_and_exact_name_pairing(tmp_path):
    names = ["040617#2_S127(2)0015", "a[1]", "b*", "plain"]
    truth = {}
    for i, n in enumerate(names):
        truth[n] = write_pair(tmp_path / "train", tmp_path / "train_annot", n, seed=i, mask_ext=".tif")
    write_pair(tmp_path / "val", tmp_path / "val_masks", "v", seed=9)
    write_pair(tmp_path / "test", tmp_path / "test_labels", "t", seed=10)
    write_pair(tmp_path / "different_test" / "images", tmp_path / "different_test" / "masks", "d", seed=11)
    s = pair_files(spec(tmp_path), base_dir="/")
    assert [x.split for x in s] == ["train"] * 4 + ["val", "test", "different_test"]
    ds = load_dataset(spec(tmp_path), splits=["train"])
    for n, (g, m) in truth.items():  # every image sits with its own mask (nothing shifted)
        assert np.array_equal(ds.mask.sel(sample=n).values, m) and np.isclose(float(ds.image.sel(sample=n)[0, 0, 0]), g[0, 0] / 255)


def test_unpaired_files_are_all_named(tmp_path):
    for i in range(5):
        write_pair(tmp_path / "train", tmp_path / "train_annot", f"img{i}", seed=i, mask_stem=f"img{i}_mask")
    (tmp_path / "train_annot" / "img1_mask.png").unlink()
    (tmp_path / "train_annot" / "img3_mask.png").unlink()
    Image.fromarray(grey()).save(tmp_path / "train_annot" / "orphan(1)_mask.png")
    e = err(pair_files, spec(tmp_path, layout={"mask_suffix": "_mask"}))
    assert "img1.png" in e and "img3.png" in e and "orphan(1)_mask.png" in e and "img0" not in e
    e2 = err(pair_files, spec(tmp_path))  # wrong mask_suffix: a hint
    assert '"mask_suffix": "_mask"' in e2


def test_flat_split_is_seeded_deterministic_nonempty(tmp_path):
    for i in range(7):
        write_pair(tmp_path / "images", tmp_path / "masks", f"s{i:02d}", seed=i)
    sp = spec(tmp_path, layout={"kind": "flat"})
    a, b = pair_files(sp), pair_files(sp)
    assert [(x.name, x.split) for x in a] == [(x.name, x.split) for x in b]
    counts = {k: sum(x.split == k for x in a) for k in ("train", "val", "test")}
    assert counts == {"train": 5, "val": 1, "test": 1}
    other = pair_files(spec(tmp_path, layout={"kind": "flat", "split_seed": 3}))
    assert [x.split for x in other] != [x.split for x in a]
    assert split_counts(3, {"train": 0.8, "val": 0.1, "test": 0.1}) == {"train": 1, "val": 1, "test": 1}
    assert split_counts(100, {"train": 0.7, "val": 0.15, "test": 0.15}) == {"train": 70, "val": 15, "test": 15}


def test_channel_suffixes_afm(tmp_path):
    h = RNG.normal(size=(16, 20)).astype(np.float32)
    (tmp_path / "images").mkdir(); (tmp_path / "masks").mkdir()
    for stem in ("scan1", "scan2"):
        tifffile.imwrite(tmp_path / "images" / f"{stem}_height.tif", h)
        tifffile.imwrite(tmp_path / "images" / f"{stem}_phase.tif", -h * 3)
        Image.fromarray((h > 0).astype(np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    sp = spec(tmp_path, channels=["height", "phase"], layout={"kind": "flat", "channel_suffixes": {"height": "_height", "phase": "_phase"},
                                                              "split_fractions": {"train": 0.5, "test": 0.5}})
    s = pair_files(sp)
    assert sorted(x.name for x in s) == ["scan1", "scan2"] and [p.name for p in s[0].image] == ["scan1_height.tif", "scan1_phase.tif"]
    ds = load_dataset(sp)
    assert ds.image.shape == (2, 2, 16, 20) and list(ds.channel.values) == ["height", "phase"]
    # per-channel percentile scaling: the phase channel is the inverted height
    assert np.allclose(ds.image.values[0, 0], 1 - ds.image.values[0, 1], atol=1e-5)
    (tmp_path / "images" / "scan2_phase.tif").unlink()
    e = err(pair_files, sp)
    assert "scan2" in e and "missing phase" in e


def test_volume_layout(tmp_path):
    vol = RNG.integers(0, 4000, (12, 10, 8)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "ct.tif", vol)
    np.save(tmp_path / "ct_mask.npy", (vol > 2000).astype(np.uint8))
    sp = spec(tmp_path, modality="XCT", layout={"kind": "volume", "volume_image": "ct.tif", "volume_mask": "ct_mask.npy", "axis": 2})
    ds = load_dataset(sp)
    assert ds.image.shape == (8, 1, 12, 10) and list(ds.split.values) == ["train"] * 6 + ["val", "test"]
    assert np.array_equal(ds.mask.values[3], vol[:, :, 3] > 2000)
    np.save(tmp_path / "ct_mask.npy", np.zeros((12, 10, 9), np.uint8))
    assert "must match" in err(pair_files, sp)


def _spots(root, spots=6, angles=(0, 180)):
    "A flat layout where every spot is imaged at two angles: spot3_0deg, spot3_180deg, ..."
    for i in range(spots):
        for a in angles:
            write_pair(root / "images", root / "masks", f"spot{i}_{a}deg", seed=i * 10 + a // 180)


def test_flat_group_keeps_a_spot_in_one_split(tmp_path):
    _spots(tmp_path)
    fr = {"train": 0.5, "val": 0.25, "test": 0.25}
    straddle = False
    for seed in range(6):
        plain = pair_files(spec(tmp_path, layout={"kind": "flat", "split_fractions": fr, "split_seed": seed}))
        straddle |= any(len({x.split for x in plain if x.name.startswith(f"spot{i}_")}) > 1 for i in range(6))
        s = pair_files(spec(tmp_path, layout={"kind": "flat", "split_fractions": fr, "split_seed": seed, "group": r"spot(\d+)_"}))
        assert len(s) == 12
        per_spot = {i: {x.split for x in s if x.name.startswith(f"spot{i}_")} for i in range(6)}
        assert all(len(v) == 1 for v in per_spot.values()), per_spot  # both angles of a spot share a split
        # the fractions apply to the 6 groups: split_counts(6, 0.5/0.25/0.25) = 3/2/1 spots = 6/4/2 images
        assert {k: sum(x.split == k for x in s) for k in fr} == {"train": 6, "val": 4, "test": 2}
    assert straddle  # without the pattern some spot's two angles do land in two splits


def test_flat_group_whole_match_and_unmatched_names(tmp_path):
    _spots(tmp_path, spots=4)
    s = pair_files(spec(tmp_path, layout={"kind": "flat", "group": r"spot\d+", "split_fractions": {"train": 0.5, "test": 0.5}}))
    assert all(len({x.split for x in s if x.name.startswith(f"spot{i}_")}) == 1 for i in range(4))
    assert sum(x.split == "train" for x in s) == 4
    write_pair(tmp_path / "images", tmp_path / "masks", "calibration", seed=99)
    e = err(pair_files, spec(tmp_path, layout={"kind": "flat", "group": r"spot(\d+)_"}))
    assert "'calibration'" in e and json.dumps(r"spot(\d+)_") in e and "spot0" not in e


def test_volume_gap_between_split_slabs(tmp_path):
    vol = RNG.integers(0, 4000, (12, 10, 8)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "ct.tif", vol)
    np.save(tmp_path / "ct_mask.npy", (vol > 2000).astype(np.uint8))
    lay = {"kind": "volume", "volume_image": "ct.tif", "volume_mask": "ct_mask.npy", "axis": 0}
    s = pair_files(spec(tmp_path, modality="XCT", layout=lay | {"gap": 2}))
    # 12 slices - 2 gaps of 2 = 8 used: split_counts(8, .7/.15/.15) = 6/1/1 -> train 0-5, gap 6-7, val 8, gap 9-10, test 11
    assert [(x.index, x.split) for x in s] == [(i, "train") for i in range(6)] + [(8, "val"), (11, "test")]
    assert [x.index for x in pair_files(spec(tmp_path, modality="XCT", layout=lay))] == list(range(12))  # gap 0: all slices
    ds = load_dataset(spec(tmp_path, modality="XCT", layout=lay | {"gap": 2}))
    assert np.array_equal(ds.mask.values[-1], vol[11] > 2000)
    e = err(pair_files, spec(tmp_path, modality="XCT", layout=lay | {"gap": 5}))
    assert "12 slices" in e and "needs at least 13" in e and "layout.gap" in e


# ---------------------------------------------------------------- non-finite, boolean and constant images
def test_nonfinite_pixels_are_an_error_naming_file_and_count(tmp_path):
    img = RNG.normal(100, 5, (16, 20)).astype(np.float32)
    img[2, 3] = np.nan; img[4, 5] = np.inf; img[6, 7] = -np.inf
    (tmp_path / "images").mkdir(); (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", img)
    Image.fromarray((img > 100).astype(np.uint8)).save(tmp_path / "masks" / "a.png")
    sp = spec(tmp_path, layout={"kind": "flat", "split_fractions": {"train": 1.0}})
    e = err(load_dataset, sp)
    assert str(tmp_path / "images" / "a.tif") in e and "3 of 320 pixels are not finite" in e
    assert "1 NaN, 1 +inf, 1 -inf" in e and '"nonfinite": "fill"' in e
    # the function-level guard: normalize itself refuses, whatever the kind
    for kind in ("auto", "percentile", "minmax", "none"):
        assert "3 of 320" in err(normalize, img[None], NormSpec(kind=kind), source="x.tif")


def test_nonfinite_fill_warns_and_uses_the_finite_median(tmp_path):
    img = np.arange(16 * 20, dtype=np.float32).reshape(16, 20)
    img[0, 0] = np.nan; img[0, 1] = np.inf
    (tmp_path / "images").mkdir(); (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "a.tif", img)
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "masks" / "a.png")
    sp = spec(tmp_path, layout={"kind": "flat", "split_fractions": {"train": 1.0}},
              normalization=NormSpec(kind="minmax", nonfinite="fill"))
    with pytest.warns(UserWarning, match=r"a\.tif: 2 non-finite pixels \(1 NaN, 1 \+inf, 0 -inf\)"):
        ds = load_dataset(sp)
    x = ds.image.values[0, 0]
    finite = np.arange(2, 320, dtype=np.float64)  # the 318 finite values 2..319, median 160.5
    assert np.isfinite(x).all() and x.max() == 1 and x.min() == 0  # not a blank image
    assert np.allclose(x[0, :2], (160.5 - 2) / (319 - 2)) and np.median(finite) == 160.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filled = check_finite(img[None], "a.tif", "fill")
    assert len(caught) == 1 and "a.tif" in str(caught[0].message)
    assert filled[0, 0, 0] == filled[0, 0, 1] == 160.5 and np.isnan(img[0, 0])  # a copy; the input is untouched
    assert "no finite pixel" in err(check_finite, np.full((2, 3, 3), np.nan), "b.tif", "fill")


def test_one_nan_pixel_no_longer_blanks_the_image():
    img = RNG.normal(size=(1, 32, 32)).astype(np.float32); img[0, 0, 0] = np.nan
    with pytest.raises(MatsegError, match="1 of 1024"):
        normalize(img)
    with pytest.warns(UserWarning):
        out = normalize(img, NormSpec(nonfinite="fill"))
    assert np.isfinite(out).all() and out.std() > 0.1  # today's bug: every pixel became 0


def test_boolean_images_are_0_and_1(tmp_path):
    b = RNG.random((1, 8, 9)) > 0.5
    for kind in ("auto", "percentile", "minmax", "none"):
        out = normalize(b, NormSpec(kind=kind))
        assert out.dtype == np.float32 and np.array_equal(out, b.astype(np.float32)), kind
    Image.fromarray(b[0]).save(tmp_path / "bits.png")  # a 1-bit PNG
    assert read_image(tmp_path / "bits.png").dtype == bool
    assert np.array_equal(normalize(read_image(tmp_path / "bits.png")), b.astype(np.float32))  # 1, not 1/255
    assert read_mask(tmp_path / "bits.png").dtype == np.uint8 and read_mask(tmp_path / "bits.png").max() == 1


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
@pytest.mark.parametrize("kind", ["auto", "percentile", "minmax", "none"])
def test_constant_image_is_defined(dtype, kind):
    x = np.full((2, 5, 6), 7, dtype)
    out = normalize(x, NormSpec(kind=kind))
    assert np.isfinite(out).all() and out.dtype == np.float32
    expected = 7.0 if kind == "none" else 7 / 255 if (kind == "auto" and dtype == np.uint8) else 0.0
    assert np.allclose(out, expected)


# ---------------------------------------------------------------- bad input
def test_size_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path / "train", tmp_path / "train_annot", "ok", seed=1)
    write_pair(tmp_path / "train", tmp_path / "train_annot", "big#2", seed=2)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train_annot" / "big#2.png")
    before = sorted(p for p in tmp_path.rglob("*"))
    e = err(load_dataset, spec(tmp_path))
    assert "big#2.png" in e and "train_annot" in e and "16x20" in e and "8x8" in e
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


def test_empty_split_and_missing_root(tmp_path):
    write_pair(tmp_path / "train", tmp_path / "train_annot", "a")
    (tmp_path / "val").mkdir(); (tmp_path / "val_annot").mkdir()
    e = err(pair_files, spec(tmp_path))
    assert "'val'" in e and "no images" in e and str(tmp_path / "val") in e
    e = err(pair_files, spec("no/such/dir"), base_dir=tmp_path)
    assert "'no/such/dir'" in e and "relative to the profile" in e and str(tmp_path) in e
    e = err(pair_files, spec(tmp_path / "train"))
    assert "no split folders" in e


def test_label_out_of_range_names_file(tmp_path):
    write_pair(tmp_path / "train", tmp_path / "train_annot", "a")
    Image.fromarray(np.full((16, 20), 255, np.uint8)).save(tmp_path / "train_annot" / "a.png")
    e = err(load_dataset, spec(tmp_path))
    assert "a.png" in e and "255: 320 px" in e


def test_corrupt_file_in_dataset(tmp_path):
    write_pair(tmp_path / "train", tmp_path / "train_annot", "a")
    (tmp_path / "train" / "b.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "train_annot" / "b.png")
    e = err(load_dataset, spec(tmp_path))
    assert "b.png" in e and "re-export" in e


def test_different_sizes_channels_and_unknown_split(tmp_path):
    write_pair(tmp_path / "train", tmp_path / "train_annot", "a")
    write_pair(tmp_path / "train", tmp_path / "train_annot", "b", h=24, w=24)
    e = err(load_dataset, spec(tmp_path))
    assert "different sizes" in e and "16x20" in e and "24x24" in e and "crop" in e
    (tmp_path / "train" / "b.png").unlink(); (tmp_path / "train_annot" / "b.png").unlink()
    Image.fromarray(np.dstack([grey(), grey(seed=1), grey(seed=2)])).save(tmp_path / "train" / "a.png")
    e = err(load_dataset, spec(tmp_path))
    assert "3 channel(s)" in e and "'channels'" in e
    assert "no split 'val'" in err(load_dataset, spec(tmp_path), splits="val")


# ---------------------------------------------------------------- normalisation
def test_normalize():
    u8 = np.array([[[0, 51, 255]]], np.uint8)
    assert np.allclose(normalize(u8), [[[0, 0.2, 1]]]) and normalize(u8).dtype == np.float32
    ramp = np.arange(101, dtype=np.uint16).reshape(1, 1, 101) * 10
    assert np.allclose(normalize(ramp, NormSpec(low=10, high=90)), np.clip((ramp.astype(float) - 100) / 800, 0, 1), atol=1e-6)
    f = np.array([[[-2.0, 0.0, 6.0]]], np.float32)
    assert np.allclose(normalize(f, NormSpec(kind="minmax")), [[[0, 0.25, 1]]])
    assert np.array_equal(normalize(f, NormSpec(kind="none")), f)
    assert np.allclose(normalize(u8, NormSpec(kind="percentile", low=0, high=100)), [[[0, 0.2, 1]]])
    assert normalize(np.full((2, 3, 3), 5, np.uint16)).max() == 0


def test_imagenet_normalize_numpy_and_torch():
    import torch
    x = np.full((2, 3, 4, 4), 0.5, np.float32)
    y = imagenet_normalize(x)
    assert np.allclose(y[0, :, 0, 0], (0.5 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), atol=1e-6)
    t = imagenet_normalize(torch.full((1, 1, 2, 2), 0.5))
    assert torch.allclose(t, torch.full_like(t, (0.5 - np.mean([0.485, 0.456, 0.406])) / np.mean([0.229, 0.224, 0.225])))


# ---------------------------------------------------------------- tiling
@pytest.mark.parametrize("length,size,overlap", [(512, 512, 64), (100, 128, 0), (1000, 256, 32), (513, 512, 0),
                                                 (300, 128, 100), (2048, 512, 64), (37, 8, 7)])
def test_tile_starts_cover_with_overlap(length, size, overlap):
    st = tile_starts(length, size, overlap)
    assert st[0] == 0 and st == sorted(set(st))
    if length <= size: assert st == [0]
    else:
        assert st[-1] == length - size
        assert all(b - a <= size - overlap for a, b in zip(st, st[1:]))


@pytest.mark.parametrize("blend", ["center", "mean"])
@pytest.mark.parametrize("shape,size,overlap", [((300, 410), 128, 40), ((64, 64), 64, 16), ((50, 70), 96, 8), ((129, 257), 64, 0)])
def test_stitch_inverts_tile(shape, size, overlap, blend):
    x = RNG.normal(size=(2, 3, *shape)).astype(np.float32)
    t, starts = tile(x, size, overlap)
    assert t.shape[-2:] == (min(size, shape[0]), min(size, shape[1]))
    np.testing.assert_allclose(stitch(t, starts, shape, blend), x, rtol=0, atol=1e-6)


def test_center_blend_keeps_central_predictions():
    t, starts = tile(np.zeros((1, 100)), 60, 20)  # starts (0,0), (0,40)
    ids = np.stack([np.full((1, 60), i, float) for i in range(len(starts))])
    out = stitch(ids, starts, (1, 100))
    assert out[0, 49] == 0 and out[0, 50] == 1  # the overlap 40..60 is cut in its middle
    mean = stitch(ids, starts, (1, 100), blend="mean")
    assert mean[0, 45] == 0.5 and mean[0, 30] == 0
    assert "overlap" in err(tile_starts, 100, 32, 32)


def test_tile_dataset():
    ds = load_dataset(_sample_spec())
    td = tile(ds, 256, 0)
    assert td.image.shape == (72, 1, 256, 256) and td.sizes["sample"] == 4 * ds.sizes["sample"]
    first = td.isel(sample=3)
    assert first.source.item() == ds.sample.values[0] and (first.tile_y.item(), first.tile_x.item()) == (256, 256)
    assert np.array_equal(first.mask.values, ds.mask.values[0, 256:, 256:])


# ---------------------------------------------------------------- shipped sample, summaries, CLI
def _sample_spec():
    return spec(SAMPLE, classes=SUPER1_CLASSES, mask_encoding=SUPER1_PAL, layout={"mask_suffix": "_mask"})


def test_shipped_sample_is_small_attributed_and_loads():
    files = [p for p in SAMPLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5e6
    assert "Permission is hereby granted" in (SAMPLE / "LICENSE.txt").read_text()
    att = (SAMPLE / "ATTRIBUTION.md").read_text()
    assert "f50b568" in att and "Stuckner" in att and "npj" in att
    ds = load_dataset(_sample_spec())
    assert ds.image.shape == (18, 1, 512, 512) and ds.image.dtype == np.float32 and ds.mask.dtype == np.uint8
    assert list(ds.split.values) == ["train"] * 10 + ["val"] * 4 + ["test"] * 4
    assert json.loads(ds.attrs["classes"]) == SUPER1_CLASSES and ds.attrs["modality"] == "SEM"
    assert list(ds.file.values)[0].endswith(".png") and isinstance(pair_files(_sample_spec())[0], Sample)
    img, m = read_sample(pair_files(_sample_spec())[5], _sample_spec())
    assert np.array_equal(img, ds.image.values[5]) and np.array_equal(m, ds.mask.values[5])
    sp16 = _sample_spec().model_copy(update={"normalization": NormSpec(kind="minmax")})
    assert normalize(np.array([[[2, 4]]], np.uint8), sp16).tolist() == [[[0.0, 1.0]]]  # a DatasetSpec's normalization
    cf = class_fraction(ds)
    oracle = np.bincount(ds.mask.values[:10].ravel(), minlength=3) / ds.mask.values[:10].size  # the 10 train images
    assert np.allclose(cf.sel(split="train").values, oracle) and cf.dims == ("split", "class")


def test_shipped_sample_matches_originals(nasa):
    "The converted sample decodes to exactly the original Super1 images and masks."
    real = spec(nasa / "Super1", classes=SUPER1_CLASSES, mask_encoding=SUPER1_PAL, layout={"mask_suffix": "_mask"})
    orig = {s.name: s for s in pair_files(real)}
    ds = load_dataset(_sample_spec())
    for name in ds.sample.values:
        s = orig[name]
        assert np.array_equal(ds.image.sel(sample=name).values[0], read_image(s.image)[0] / np.float32(255))
        raw = read_mask(s.mask, rgb=True)
        assert np.array_equal(ds.mask.sel(sample=name).values, decode_mask(raw, SUPER1_PAL, SUPER1_CLASSES))


def test_summarize_shape_and_cli(tmp_path, capsys):
    from matseg.cli import main
    prof = load_profile(asset_path("profiles", "sample.json"))
    s = summarize(prof)
    (d,) = s["datasets"]
    assert set(d) == {"name", "modality", "splits", "classes", "class_fraction", "shapes", "dtypes", "channels"}
    assert d["splits"] == {"train": 10, "val": 4, "test": 4} and d["shapes"] == [[1, 512, 512]] and d["dtypes"] == ["uint8"]
    assert all(len(v) == 3 and abs(sum(v) - 1) < 1e-5 for v in d["class_fraction"].values())
    r = run_matseg("data", asset_path("profiles", "sample.json"), "--json")  # the real console script, once
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == json.loads(json.dumps(s))
    assert main(["data", str(asset_path("profiles", "sample.json"))]) == 0
    out = capsys.readouterr().out
    assert "train 10 / val 4 / test 4" in out and "secondary_gamma_prime" in out and "1x512x512" in out
    bad = json.loads(asset_path("profiles", "sample.json").read_text())
    bad["datasets"][0]["root"] = "missing_folder"
    (tmp_path / "p.json").write_text(json.dumps(bad))
    assert main(["data", str(tmp_path / "p.json")]) == 2
    e = capsys.readouterr().err
    assert "missing_folder" in e and str(tmp_path) in e and "Traceback" not in e


def test_real_nasa_sets(nasa):
    t0 = time.perf_counter()
    s1 = summarize(load_profile(REPO / "profiles/super1.json"))["datasets"][0]
    elapsed = time.perf_counter() - t0
    e2 = summarize(load_profile(REPO / "profiles/ebc2.json"))["datasets"][0]
    assert s1["splits"] == {"train": 10, "val": 4, "test": 4} and len(s1["classes"]) == 3 and s1["shapes"] == [[1, 512, 512]]
    assert e2["splits"] == {"train": 4, "val": 3, "test": 3} and e2["shapes"] == [[1, 1024, 1024]]
    crack = [f[2] for f in e2["class_fraction"].values()]
    assert all(0.0015 < c < 0.005 for c in crack), crack  # ~0.3 % cracks
    assert 0.01 < s1["class_fraction"]["train"][2] < 0.05 and 0.4 < s1["class_fraction"]["train"][1] < 0.6
    assert elapsed < 10, f"reading the 18 Super1 images took {elapsed:.1f} s"


# ---------------------------------------------------------------- COCO instance annotations and the ignore label
from conftest import SHARED_DATA  # noqa: E402
from matseg.data import coco_images, coco_mask, dataset_ignore_index, read_coco  # noqa: E402
from matseg.profile import CocoEncoding  # noqa: E402

MELTPOOL = SHARED_DATA / "meltpool"
SQUARE = [0, 0, 4, 0, 4, 4, 0, 4]  # pycocotools fills pixels 0..3 x 0..3: 16 pixels


def write_coco(root, images, annotations, categories=({"id": 1, "name": "melt pool"},), name="ann.json", size=(8, 10),
               on_disk=None):
    "A COCO file under root (images: file names; annotations: (image index, polygons or RLE, extra keys)) + the PNGs."
    h, w = size
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    ims = [{"id": 10 + i, "file_name": f"./data/x/{f}", "height": h, "width": w} for i, f in enumerate(images)]
    for f in (images if on_disk is None else on_disk):
        Image.fromarray(grey(h, w)).save(root / "imgs" / f)
    anns = [{"id": 100 + k, "image_id": 10 + i, "category_id": 1, "iscrowd": 0, "segmentation": seg, **extra}
            for k, (i, seg, extra) in enumerate(annotations)]
    (root / name).write_text(json.dumps({"images": ims, "annotations": anns, "categories": list(categories)}))
    return root / name


def coco_spec(root, annotations="ann.json", classes=("background", "melt_pool"), ignore_index=None, layout=None, **enc):
    return DatasetSpec(name="mp", modality="Optical", material="steel", root=str(root), classes=list(classes),
                       layout=LayoutSpec(kind="flat", **(layout or {})), ignore_index=ignore_index,
                       mask_encoding=CocoEncoding(annotations=annotations, images="imgs", **enc))


def test_coco_polygons_rle_overlap_and_instances(tmp_path):
    rle = {"size": [8, 10], "counts": [0, 2, 6, 2, 70]}  # column-major runs: (0,0),(1,0) and (0,1),(1,1) -> 4 pixels
    big = [0, 0, 6, 0, 6, 6, 0, 6]  # 36 pixels, covers the square
    write_coco(tmp_path, ["a.png"], [(0, [big], {}), (0, [SQUARE], {}), (0, rle, {})])
    s = coco_spec(tmp_path, categories={"melt pool": "melt_pool"})
    (im,) = coco_images(s, tmp_path / "ann.json", tmp_path)
    mask, inst, ids = coco_mask(im, s.mask_encoding)
    assert ids == [100, 101, 102] and mask.dtype == np.uint8 and inst.dtype == np.uint16
    assert mask.sum() == 36 and mask[:6, :6].all()  # everything melt pool, nothing else
    # smallest on top: the RLE (4 px) over the square (16 px) over the big one (36 px)
    assert (inst[:2, :2] == 3).all() and (inst[:4, :4] == 2).sum() == 12 and (inst == 1).sum() == 20
    _, inst_last, _ = coco_mask(im, CocoEncoding(annotations="ann.json", overlap="last"))
    assert (inst_last[:2, :2] == 3).all() and (inst_last == 2).sum() == 12  # file order: the same here, RLE last
    m_ign, inst_ign, _ = coco_mask(im, CocoEncoding(annotations="ann.json", overlap="ignore"), ignore_index=255)
    assert (m_ign == 255).sum() == 16 and (m_ign == 1).sum() == 20 and (inst_ign[:4, :4] == 0).all()


def test_coco_crowd_and_unannotated_are_the_ignore_label(tmp_path):
    write_coco(tmp_path, ["a.png"], [(0, [SQUARE], {"iscrowd": 1}), (0, [[0, 0, 2, 0, 2, 2, 0, 2]], {})])
    s = coco_spec(tmp_path, ignore_index=255)
    (im,) = coco_images(s, tmp_path / "ann.json", tmp_path)
    mask, inst, ids = coco_mask(im, s.mask_encoding, 255)
    assert ids == [101] and (mask == 1).sum() == 4 and (mask == 255).sum() == 12 and (mask == 0).sum() == 80 - 16
    with pytest.raises(MatsegError, match=r"no ignore_index.*\"ignore_index\": 255"):
        coco_mask(im, s.mask_encoding, None)
    m2, _, _ = coco_mask(im, CocoEncoding(annotations="a", unannotated="ignore"), 255)
    assert (m2 == 255).sum() == 80 - 4  # only the one object is labelled
    m3, _, ids3 = coco_mask(im, CocoEncoding(annotations="a", crowd="category"), 255)
    assert (m3 == 1).sum() == 16 and ids3 == [100, 101]


def test_coco_splits_by_file_and_by_group(tmp_path):
    names = [f"S{g}_{x}.png" for g in range(4) for x in (0, 256)]
    write_coco(tmp_path, names, [(i, [SQUARE], {}) for i in range(len(names))])
    write_coco(tmp_path, ["T_0.png"], [], name="test.json")
    s = coco_spec(tmp_path, {"ann.json": {"train": 0.5, "val": 0.5}, "test.json": "test"}, layout={"group": r"^(S\d+|T)_"})
    samples = pair_files(s)
    assert [x.split for x in samples].count("test") == 1 and len(samples) == 9
    by_group = {}
    for x in samples: by_group.setdefault(x.name.split("_")[0], set()).add(x.split)
    assert all(len(v) == 1 for v in by_group.values()) and sorted(len([g for g, v in by_group.items() if v == {k}])
                                                                  for k in ("train", "val")) == [2, 2]
    ds = load_dataset(s)
    assert ds["instances"].shape == (9, 8, 10) and dataset_ignore_index(ds) is None
    ids = json.loads(ds.attrs["instance_ids"])
    assert ids[samples[0].name] == [100 + names.index(samples[0].name + ".png")] and ids["T_0"] == []
    assert ds.mask.values.sum() == 8 * 16  # one 16-pixel square per train/val tile, none on the test tile
    # one file for all, split by layout.split_fractions over groups
    s1 = coco_spec(tmp_path, "ann.json", layout={"group": r"^(S\d+)_", "split_fractions": {"train": 0.5, "val": 0.5}})
    assert [x.split for x in pair_files(s1)].count("train") == 4
    # a group given two splits by two files is an error naming it
    write_coco(tmp_path, ["S0_512.png"], [], name="leak.json")
    leak = coco_spec(tmp_path, {"ann.json": "train", "leak.json": "test"}, layout={"group": r"^(S\d+)_"})
    with pytest.raises(MatsegError, match=r"S0 in \['test', 'train'\]"):
        pair_files(leak)


@pytest.mark.parametrize("case, match", [
    ("missing_image_id", r"annotation id 101 \(annotations\[1\]\) -> image_id 99.*lists image ids 10"),
    ("absent_on_disk", r"1 image\(s\) listed in 'images' are not on disk under .*imgs.*\./data/x/b\.png"),
    ("unknown_category", r"COCO category 'pore' is not among the profile's classes \['background', 'melt_pool'\]"),
    ("two_points", r"annotation id 100 on image '\./data/x/a\.png': polygon 0 has 2 points.*at least 3"),
    ("outside", r"polygon 0 reaches outside the 10x8 \(WxH\) image \(x 0\.\.11"),
    ("rle_size", r"RLE size \[4, 4\] is not the image's \[8, 10\]"),
    ("invalid_json", r"ann\.json:3:5: not valid JSON"),
])
def test_coco_bad_input(tmp_path, case, match):
    anns, images, on_disk, cats = [(0, [SQUARE], {})], ["a.png"], None, ({"id": 1, "name": "melt pool"},)
    if case == "missing_image_id": anns = [(0, [SQUARE], {}), (89, [SQUARE], {})]
    if case == "absent_on_disk": images, on_disk = ["a.png", "b.png"], ["a.png"]
    if case == "unknown_category": cats = ({"id": 1, "name": "pore"},)
    if case == "two_points": anns = [(0, [[0, 0, 4, 4]], {})]
    if case == "outside": anns = [(0, [[0, 0, 11, 0, 11, 4]], {})]
    if case == "rle_size": anns = [(0, {"size": [4, 4], "counts": [0, 16]}, {})]
    path = write_coco(tmp_path, images, anns, cats, on_disk=on_disk)
    if case == "invalid_json": path.write_text('{\n  "images": [],\n    ,\n}')
    with pytest.raises(MatsegError, match=match):
        pair_files(coco_spec(tmp_path))


def test_coco_category_mapping_by_name_and_to_ignore(tmp_path):
    cats = ({"id": 1, "name": "Melt-Pool"}, {"id": 2, "name": "scratch"}, {"id": 3, "name": "unused"})
    write_coco(tmp_path, ["a.png"], [(0, [SQUARE], {}), (0, [[6, 0, 8, 0, 8, 2, 6, 2]], {"category_id": 2})], cats)
    s = coco_spec(tmp_path, categories={"Melt-Pool": "melt_pool", "scratch": None}, ignore_index=255)
    _, m = read_sample(pair_files(s)[0], s)
    assert (m == 1).sum() == 16 and (m == 255).sum() == 4  # 'unused' is listed but never used: no error
    with pytest.raises(MatsegError, match=r"COCO category 'scratch' is not among"):
        pair_files(coco_spec(tmp_path))  # by name: 'Melt-Pool' finds melt_pool, 'scratch' finds nothing


def test_ignore_label_for_raster_encodings():
    idx = np.array([[0, 1, 255], [1, 0, 255]], np.uint8)
    assert (decode_mask(idx, IndexEncoding(), ["a", "b"], ignore_index=255) == idx).all()
    with pytest.raises(MatsegError, match=r"255: 2 px.*set the dataset's ignore_index"):
        decode_mask(idx, IndexEncoding(), ["a", "b"])
    b = decode_mask(np.array([[0, 200, 7]], np.uint8), BinaryEncoding(ignore_value=7), ["bg", "fg"], ignore_index=255)
    assert b.tolist() == [[0, 1, 255]]
    rgb = np.array([[[0, 0, 255], [9, 9, 9], [255, 255, 0]]], np.uint8)
    p = decode_mask(rgb, PaletteEncoding(colors={"fg": [0, 0, 255]}, default_class="bg", ignore_color=[255, 255, 0]),
                    ["bg", "fg"], ignore_index=255)
    assert p.tolist() == [[1, 0, 255]]
    with pytest.raises(MatsegError, match="ignore_color"):
        decode_mask(rgb, PaletteEncoding(colors={"fg": [0, 0, 255]}, default_class="bg", ignore_color=[255, 255, 0]),
                    ["bg", "fg"])


def test_summary_excludes_ignored_pixels(tmp_path):
    write_coco(tmp_path, ["a.png"], [(0, [SQUARE], {"iscrowd": 1}), (0, [[0, 0, 2, 0, 2, 2, 0, 2]], {})])
    s = coco_spec(tmp_path, {"ann.json": "train"}, ignore_index=255)
    d = summarize(type("P", (), {"datasets": [s], "base_dir": None})())["datasets"][0]
    assert d["class_fraction"]["train"] == [round(64 / 68, 6), round(4 / 68, 6)]  # 80 px, 12 ignored
    assert d["ignored_fraction"]["train"] == 0.15 and d["instances"] == {"train": 1}


@pytest.mark.skipif(not (MELTPOOL / "annotations").is_dir(), reason=f"melt-pool set not found at {MELTPOOL}")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' decode under numpy 2
def test_meltpool_real_set_splits_by_slice():
    prof = load_profile(REPO / "profiles/meltpool.json")
    spec_ = prof.datasets[0]
    samples = pair_files(spec_, prof.base_dir)
    slice_of = {s.name: s.name.split("_")[0] for s in samples}
    splits = {}
    for s in samples: splits.setdefault(slice_of[s.name], set()).add(s.split)
    assert all(len(v) == 1 for v in splits.values()) and len(splits) == 7
    assert splits["Slice-10Bottom"] == {"test"} and {s.split for s in samples} == {"train", "val", "test"}
    assert {s.split: sum(x.split == s.split for x in samples) for s in samples} == {"train": 165, "val": 34, "test": 32}
    # a few tiles: masks agree with pycocotools on the raw polygons, instances keep the annotation ids
    from pycocotools import mask as mu
    raw = read_coco(MELTPOOL / "annotations" / "validation.json")
    im = raw["images"][0]
    anns = [a for a in raw["annotations"] if a["image_id"] == im["id"]]
    ref = np.zeros((im["height"], im["width"]), bool)
    for a in anns: ref |= mu.decode(mu.merge(mu.frPyObjects(a["segmentation"], im["height"], im["width"]))).astype(bool)
    smp = next(s for s in samples if s.coco is not None and s.coco.id == im["id"] and s.split == "test")
    img, m = read_sample(smp, spec_)
    assert img.shape == (1, 512, 512) and np.array_equal(m == 1, ref)
    _, inst, ids = coco_mask(smp.coco, spec_.mask_encoding, 255)
    assert ids == [a["id"] for a in anns] and set(np.unique(inst)) <= set(range(len(ids) + 1))


@pytest.mark.skipif(not (MELTPOOL / "annotations").is_dir(), reason=f"melt-pool set not found at {MELTPOOL}")
def test_cli_data_meltpool_reports_slices_and_fraction():
    r = run_matseg("data", REPO / "profiles/meltpool.json", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["datasets"][0]
    assert d["classes"] == ["background", "melt_pool"] and d["modality"] == "Optical"
    groups = d["groups"]
    assert set(groups["test"]) == {"Slice-10Bottom"} and len(set(groups["train"]) | set(groups["val"])) == 6
    assert not set(groups["train"]) & set(groups["val"])
    total = sum(d["splits"].values())
    frac = sum(d["class_fraction"][k][1] * d["splits"][k] for k in d["splits"]) / total
    assert 0.065 < frac < 0.075 and d["instances"] == {"train": 887, "val": 188, "test": 187}

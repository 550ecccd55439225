"""GPA (01_stylize.py): colour conversion, histogram matching, the gamma fit, the stage."""
import json

import numpy as np
import pytest

from conftest import load_stage, run_stage

gpa = load_stage("01_stylize")


def test_lab_known_values_and_round_trip():
    lab = gpa.rgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    assert lab[0] == pytest.approx([100, 0, 0], abs=1e-3)
    assert lab[1] == pytest.approx([0, 0, 0], abs=1e-6)
    assert lab[2] == pytest.approx([53.2408, 80.0925, 67.2032], abs=1e-3)  # sRGB red, D65
    rgb = np.random.default_rng(0).integers(0, 256, (50, 50, 3)).astype(np.uint8)
    back = (gpa.lab_to_rgb(gpa.rgb_to_lab(rgb)) * 255 + 0.5).astype(np.uint8)
    assert np.abs(back.astype(int) - rgb).max() <= 1


def test_histogram_matching_follows_reference():
    rng = np.random.default_rng(1)
    src, ref = rng.normal(0, 1, 20000), rng.normal(5, 3, 30000)
    out = gpa.match_histogram(src, np.quantile(ref, gpa.QUANTILES))
    assert out.mean() == pytest.approx(5, abs=0.05) and out.std() == pytest.approx(3, abs=0.05)
    assert (np.argsort(out) == np.argsort(src)).all()  # monotone: order preserved


def test_gamma_fit():
    L = np.linspace(0, 1, 1001)                     # mean 0.5
    assert gpa.fit_gamma(L, 0.5) == pytest.approx(1.0, abs=1e-3)
    g = gpa.fit_gamma(L, 1 / 3, reg=0.0)            # mean(L^g) = 1/(g+1) = 1/3 -> g = 2
    assert g == pytest.approx(2.0, abs=1e-2)
    assert 1.0 < gpa.fit_gamma(L, 1 / 3, reg=0.01) < g   # regularised toward 1


def test_gpa_matches_reference_statistics():
    rng = np.random.default_rng(2)
    src = rng.integers(0, 256, (60, 80, 3)).astype(np.uint8)
    src[..., 2] //= 3                                              # a yellowish source
    ref = (rng.normal(0, 1, (70, 90, 1)) * 20 + [90, 110, 160]).clip(0, 255).astype(np.uint8)
    stats = gpa.reference_stats(ref)
    out, gamma = gpa.gpa(src, stats)
    lab_out, lab_ref, lab_src = gpa.rgb_to_lab(out), gpa.rgb_to_lab(ref), gpa.rgb_to_lab(src)
    for ch in (1, 2):  # a and b follow the reference's distribution (up to 8-bit rounding)
        q = np.linspace(0.1, 0.9, 17)   # tails move a little: out-of-gamut colours clip
        assert np.abs(np.quantile(lab_out[..., ch], q) - np.quantile(lab_ref[..., ch], q)).max() < 1.0
    # mean lightness moves toward the reference's
    assert abs(lab_out[..., 0].mean() - lab_ref[..., 0].mean()) < abs(lab_src[..., 0].mean() - lab_ref[..., 0].mean())


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (40, 200, 90)])
def test_gpa_degenerate_images_stay_finite(colour):
    img = np.zeros((20, 30, 3), np.uint8) + np.array(colour, np.uint8)
    ref = gpa.reference_stats(np.random.default_rng(3).integers(0, 256, (20, 30, 3)).astype(np.uint8))
    out, gamma = gpa.gpa(img, ref)
    assert np.isfinite(gamma) and out.dtype == np.uint8 and out.shape == img.shape
    out2, _ = gpa.gpa(np.random.default_rng(4).integers(0, 256, (20, 30, 3)).astype(np.uint8),
                      gpa.reference_stats(img))    # a one-colour reference as well
    assert out2.dtype == np.uint8


def test_stage_deterministic_and_resumes(toy_data, tmp_path):
    w1, w2 = tmp_path / "a", tmp_path / "b"
    run_stage("01_stylize", "--data", toy_data, "--work", w1, "--workers", "0")
    run_stage("01_stylize", "--data", toy_data, "--work", w2, "--workers", "0")
    imgs = sorted((w1 / "01_stylize" / "images").glob("*.png"))
    assert imgs and all((w2 / "01_stylize" / "images" / p.name).read_bytes() == p.read_bytes() for p in imgs)
    m = json.loads((w1 / "01_stylize" / "manifest.json").read_text())
    assert m["complete"] and m["summary"]["written"] == len(imgs)
    # resume: a finished image is not redone (its file is left untouched)
    victim, keep = imgs[0], imgs[1]
    victim.unlink()
    mtime = keep.stat().st_mtime_ns
    run_stage("01_stylize", "--data", toy_data, "--work", w1, "--workers", "0")
    assert victim.exists() and keep.stat().st_mtime_ns == mtime
    # the same run continued: later stages made from it stay valid
    assert json.loads((w1 / "01_stylize" / "manifest.json").read_text())["run_id"] == m["run_id"]
    assert victim.read_bytes() == (w2 / "01_stylize" / "images" / victim.name).read_bytes()

"""Tests of 03_maps.py: the MAPs formulas (Eq. (3)-(6)) on hand-checkable numbers and
against scikit-learn, and the stage end to end on the toy data."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.mixture import GaussianMixture

from conftest import load_stage

M = load_stage("03_maps")


def random_mixtures(rng, C, K, D):
    w = rng.dirichlet(np.ones(K), size=C)                               # (C, K)
    mu = rng.normal(0, 2, size=(C, K, D)) + 3                           # (C, K, D)
    var = rng.uniform(0.2, 2.0, size=(C, K, D))
    return w, mu, var


# ============ Eq. (4)-(5): log density ============
def test_log_density_matches_sklearn():
    rng = np.random.default_rng(0)
    C, K, D = 4, 5, 32
    w, mu, var = random_mixtures(rng, C, K, D)
    x = (rng.normal(0, 2, size=(3000, D)) + 3).astype(np.float32)
    ours = M.MixtureLogDensity(w, mu, var, chunk=700)(torch.from_numpy(x)).numpy()   # (n, C)
    for c in range(C):
        ref = M.to_sklearn(w[c], mu[c], var[c]).score_samples(x.astype(np.float64))
        np.testing.assert_allclose(ours[:, c], ref, rtol=1e-4)


def test_log_density_hand_value():
    # one class, one component, D = 2, unit variance: log N(0 | (1, 1), I) = -log(2 pi) - 1
    s = M.MixtureLogDensity(np.array([[1.0]]), np.ones((1, 1, 2)), np.ones((1, 1, 2)))
    assert s(torch.zeros(1, 2)).item() == pytest.approx(-math.log(2 * math.pi) - 1, abs=1e-5)


def test_missing_components_and_classes_give_minus_inf_not_nan():
    rng = np.random.default_rng(1)
    w, mu, var = random_mixtures(rng, 3, 4, 8)
    w[1] = 0                       # class 1: no prototype
    w[2, 2:] = 0                   # class 2: 2 of 4 components
    w[2] /= w[2].sum()
    x = torch.from_numpy(rng.normal(3, 2, size=(50, 8)).astype(np.float32))
    s = M.MixtureLogDensity(w, mu, var)(x)
    assert torch.isneginf(s[:, 1]).all() and torch.isfinite(s[:, [0, 2]]).all()
    ref = M.to_sklearn(w[2, :2], mu[2, :2], var[2, :2]).score_samples(x.double().numpy())
    np.testing.assert_allclose(s[:, 2].numpy(), ref, rtol=1e-4)
    assert (M.assign_pseudo_labels(s, -1e30) != 1).all()


# ============ Eq. (4)-(5): EM ============
def test_em_recovers_known_mixture_and_matches_sklearn():
    rng = np.random.default_rng(2)
    K, D, n = 3, 6, 9000
    true_w = np.array([0.5, 0.3, 0.2])
    true_mu = rng.normal(0, 4, size=(K, D))
    true_var = rng.uniform(0.3, 1.5, size=(K, D))
    z = rng.choice(K, size=n, p=true_w)
    x = (true_mu[z] + rng.normal(size=(n, D)) * np.sqrt(true_var[z])).astype(np.float32)
    g = M.fit_gmm(torch.from_numpy(x), K, seed=0)
    assert g.converged
    order = [int(np.argmin(((g.means.numpy() - m) ** 2).sum(1))) for m in true_mu]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(g.means.numpy()[order], true_mu, atol=0.08)
    np.testing.assert_allclose(g.variances.numpy()[order], true_var, rtol=0.12)
    np.testing.assert_allclose(g.weights.numpy()[order], true_w, atol=0.02)
    # scikit-learn from the same initialisation reaches the same log-likelihood
    w0, mu0, var0 = (t.numpy() for t in g.init)
    sk = GaussianMixture(K, covariance_type="diag", weights_init=w0, means_init=mu0,
                         precisions_init=1 / var0, tol=1e-3, max_iter=100, reg_covar=1e-6).fit(x)
    ours_ll = M.MixtureLogDensity(g.weights[None], g.means[None], g.variances[None])(
        torch.from_numpy(x)).double().mean().item()
    assert abs(ours_ll - sk.score(x)) < 0.01
    assert abs(g.log_likelihood - sk.lower_bound_) < 0.01


def test_em_on_degenerate_data_stays_finite():
    x = torch.ones(40, 4)                                               # all points equal
    g = M.fit_gmm(x, 3, seed=0)
    assert torch.isfinite(g.means).all() and (g.variances > 0).all()
    assert math.isfinite(g.log_likelihood)


def test_fit_class_gmms_few_and_absent_classes():
    rng = np.random.default_rng(3)
    samples = [torch.from_numpy(rng.normal(size=(400, 4)).astype(np.float32)),  # full K
               None,                                                     # absent from the source
               torch.from_numpy(rng.normal(size=(25, 4)).astype(np.float32)),   # few: 2 components
               torch.from_numpy(rng.normal(size=(5, 4)).astype(np.float32))]    # too few: none
    w, mu, var, info = M.fit_class_gmms(samples, 4, min_per_component=10)
    assert [r["components"] for r in info] == [4, 0, 2, 0]
    assert (w[1] == 0).all() and (w[3] == 0).all() and (w[2, 2:] == 0).all()
    np.testing.assert_allclose(w.sum(1), [1, 0, 1, 0])
    assert np.isfinite(mu).all() and np.isfinite(var).all()
    s = M.MixtureLogDensity(w, mu, var)(torch.from_numpy(rng.normal(size=(20, 4)).astype(np.float32)))
    assert not torch.isnan(s).any()
    assert set(M.assign_pseudo_labels(s, -1e9).tolist()) <= {0, 2}


# ============ Eq. (6) ============
def test_eq6_hand_example():
    inf = math.inf
    scores = torch.tensor([[5.0, 3.0, 1.0],     # max 5 >= 4 -> class 0
                           [4.0, 2.0, 0.0],     # exactly delta -> kept (>=)
                           [3.9, 1.0, 0.0],     # below delta -> 255
                           [2.0, 7.0, 7.0],     # tie -> the lowest class id, 1
                           [-inf, -inf, -inf],  # no prototype anywhere -> 255
                           [-inf, 4.5, -inf]])
    assert M.assign_pseudo_labels(scores, 4.0).tolist() == [0, 0, 255, 1, 255, 1]
    assert M.assign_pseudo_labels(scores, 100.0).tolist() == [255] * 6     # all below delta
    assert M.assign_pseudo_labels(scores, -inf).tolist() == [0, 0, 0, 1, 255, 1]
    per_class = torch.tensor([6.0, 4.6, 0.0])
    assert M.assign_pseudo_labels(scores, per_class).tolist() == [255, 255, 255, 1, 255, 255]


def test_delta_for_ratio_and_per_class_thresholds():
    best = np.array([1.0, 5.0, 3.0, 2.0, 4.0, -np.inf])
    assert M.delta_for_ratio(best, 0.5) == 3.0                          # 3 of 6 are >= 3
    assert M.delta_for_ratio(best, 1 / 6) == 5.0
    assert M.delta_for_ratio(best, 0.01) == math.inf                    # round(0.06) = 0 pixels
    conf = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.5])
    arg = np.array([0, 0, 0, 0, 1, 1])
    t = M.per_class_thresholds(conf, arg, 0.5, num_classes=3)
    np.testing.assert_allclose(t, [0.8, 0.95, 0.8])                     # class 2 unseen: global


def test_centroid_score_hand_values():
    means = np.array([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]])
    s = M.CentroidScore(means, np.array([True, True, False]))(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(s[:, :2].numpy(), [[-5.0, 0.0], [0.0, -5.0]], atol=1e-5)
    assert torch.isneginf(s[:, 2]).all()


# ============ Eq. (3): sampling ============
def test_reservoir_is_uniform_and_exact_when_small():
    rng = np.random.default_rng(4)
    r = M.Reservoir(50, 1, rng)
    r.offer(torch.arange(30.0)[:, None])
    assert r.sample()[:, 0].tolist() == list(range(30)) and r.seen == 30
    hits = np.zeros(1000)
    for _ in range(2000):
        r = M.Reservoir(100, 1, rng)
        for a, b in [(0, 7), (7, 400), (400, 401), (401, 1000)]:       # uneven batches
            r.offer(torch.arange(a, b, dtype=torch.float32)[:, None])
        got = r.sample()[:, 0].long().numpy()
        assert len(np.unique(got)) == 100 and r.seen == 1000
        hits[got] += 1
    # every item is kept with probability 0.1: 200 expected of 2000, sd ~ 13.4
    assert abs(hits.mean() - 200) < 1e-9 and hits.min() > 140 and hits.max() < 260
    assert abs(hits[:100].mean() - 200) < 10 and abs(hits[-100:].mean() - 200) < 10


def test_merge_reservoirs_weights_by_rows_seen():
    rng = np.random.default_rng(5)
    from_first = []
    for _ in range(3000):
        a, b = M.Reservoir(10, 1, rng), M.Reservoir(10, 1, rng)
        a.offer(torch.zeros(90, 1))                                     # part 1 saw 90 rows
        b.offer(torch.ones(10, 1))                                      # part 2 saw 10
        s, seen = M.merge_reservoirs([(a.sample(), a.seen), (b.sample(), b.seen)], 10, rng)
        assert seen == 100 and len(s) == 10
        from_first.append(int((s == 0).sum()))
    assert abs(np.mean(from_first) - 9.0) < 0.05                        # 10 * 90 / 100


# ============ footnote 1: bilinear upsampling in bands ============
def test_upsample_rows_matches_interpolate():
    torch.manual_seed(0)
    feat = torch.randn(1, 5, 7, 9)
    H, W = 30, 37
    ref = F.interpolate(feat, size=(H, W), mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
    f = feat[0].permute(1, 2, 0).contiguous()
    iy, ix = M.bilinear_index(7, H, "cpu"), M.bilinear_index(9, W, "cpu")
    got = torch.cat([M.upsample_rows(f, iy, ix, r, min(H, r + 4)) for r in range(0, H, 4)])
    torch.testing.assert_close(got, ref.reshape(-1, 5), atol=1e-5, rtol=1e-5)


# ============ the stage on the toy data ============
def run_maps(work, data, *extra):
    return M.main(["--data", str(data), "--work", str(work), "--workers", "0", "--device", "cpu",
                   "--samples-per-class", "5000", *map(str, extra)])


@pytest.fixture(scope="module")
def maps_run(warmup_work, toy_data, tmp_path_factory):
    import shutil
    w = tmp_path_factory.mktemp("maps") / "work"
    shutil.copytree(warmup_work, w)
    summary = run_maps(w, toy_data, "--target-ratio", "0.5")
    return w, summary


def test_stage_writes_prototypes_labels_and_manifest(maps_run, toy_data):
    from common import NUM_CLASSES, decode_label, items_digest, read_manifest, target_train_items
    w, summary = maps_run
    out = w / "03_maps"
    z = np.load(out / "gmm.npz")
    assert z["weights"].shape == (NUM_CLASSES, 8) and z["means"].shape == (NUM_CLASSES, 8, 256)
    assert z["variances"].shape == (NUM_CLASSES, 8, 256) and (z["variances"] > 0).all()
    assert np.isfinite(z["means"]).all() and len(z["present"]) > 0
    np.testing.assert_allclose(z["weights"][z["present"]].sum(1), 1, atol=1e-9)
    assert (z["source_sampled"] <= 5000).all() and (z["source_sampled"] <= z["source_seen"]).all()
    targets = target_train_items(toy_data)
    labels = sorted((out / "labels").glob("*.png"))
    assert [p.name for p in labels] == sorted(p.name for p, _ in targets)
    lab = decode_label(labels[0], "trainid")
    assert set(np.unique(lab).tolist()) <= set(range(NUM_CLASSES)) | {255}
    m = read_manifest(w, "03_maps")
    assert m["target_items_digest"] == items_digest(targets)
    assert m["summary"]["pl_ratio"] == pytest.approx(0.5, abs=0.02)   # --target-ratio hits the ratio
    assert 0 <= m["summary"]["accuracy"] <= 1 and "delta" in m["summary"]["threshold"]
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["prototypes"]) == NUM_CLASSES and len(list((out / "previews").glob("*.png"))) == 4
    assert summary == m["summary"]


def test_stage_resumes_only_missing_images(maps_run, toy_data):
    w, summary = maps_run
    labels = sorted((w / "03_maps" / "labels").glob("*.png"))
    gone = labels[:2]
    for p in gone:
        p.unlink()
    before = {p: p.stat().st_mtime_ns for p in labels[2:]}
    gmm = (w / "03_maps" / "gmm.npz").stat().st_mtime_ns
    again = run_maps(w, toy_data, "--target-ratio", "0.5")
    assert all(p.exists() for p in gone)
    assert {p: p.stat().st_mtime_ns for p in labels[2:]} == before
    assert (w / "03_maps" / "gmm.npz").stat().st_mtime_ns == gmm
    assert again == summary


def test_an_interrupted_run_is_not_cleared_by_other_arguments(maps_run, toy_data, tmp_path):
    """Pseudo labels of an interrupted run (hours on the real Cityscapes) survive a rerun
    whose flag differs: the stage stops and names the flag; --resume never starts over."""
    import shutil
    import common
    w = tmp_path / "work"
    shutil.copytree(maps_run[0], w)
    (w / "03_maps" / "manifest.json").unlink()                 # killed before it finished
    labels = sorted((w / "03_maps" / "labels").glob("*.png"))
    with pytest.raises(common.StageError, match=r"unfinished run with \d+ file\(s\) written.*"
                                                r"--target-ratio 0\.5 \(now 0\.4\).*--resume never"):
        run_maps(w, toy_data, "--target-ratio", "0.4")
    assert all(p.exists() for p in labels)
    run_maps(w, toy_data, "--target-ratio", "0.4", "--resume", "never")
    assert common.read_manifest(w, "03_maps")["args"]["target_ratio"] == 0.4


@pytest.mark.parametrize("pla", ["centroid", "confidence"])
def test_baselines_write_the_same_artifacts(pla, warmup_work, toy_data, tmp_path, maps_run):
    import shutil
    shutil.copytree(warmup_work, tmp_path / "w")
    s = run_maps(tmp_path / "w", toy_data, "--pla", pla, "--target-ratio", "0.5")
    assert s["pl_ratio"] == pytest.approx(0.5, abs=0.1)           # calibrated on every target image
    n = len(list((maps_run[0] / "03_maps" / "labels").glob("*.png")))
    assert len(list((tmp_path / "w" / "03_maps" / "labels").glob("*.png"))) == n
    print(f"{pla}: ratio {s['pl_ratio']}, accuracy {s['accuracy']} "
          f"(maps: ratio {maps_run[1]['pl_ratio']}, accuracy {maps_run[1]['accuracy']})")


def test_bn_images_normalises_each_domain_with_its_own_statistics(warmup_work, toy_data, tmp_path, monkeypatch):
    # --bn-images n: Eq. (3) runs E with statistics re-estimated on n whole stylized source
    # images, Eq. (6) (calibration and labels) with statistics re-estimated on n target images
    import copy
    import shutil
    from argparse import Namespace
    import common
    shutil.copytree(warmup_work, tmp_path / "w")
    seen = {"source": [], "target": []}

    def first_bn(model):
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        return bn.running_mean.clone(), bn.running_var.clone(), model.training

    collect, score = M.collect_source_features, M.score_image
    monkeypatch.setattr(M, "collect_source_features",
                        lambda model, *a, **k: seen["source"].append(first_bn(model)) or collect(model, *a, **k))
    monkeypatch.setattr(M, "score_image",
                        lambda model, *a, **k: seen["target"].append(first_bn(model)) or score(model, *a, **k))
    s = run_maps(tmp_path / "w", toy_data, "--target-ratio", "0.5", "--bn-images", "3")
    assert s["bn_images"] == 3 and common.read_manifest(tmp_path / "w", "03_maps")["summary"]["bn_images"] == 3

    warm, _ = common.model_from_checkpoint(tmp_path / "w" / "02_warmup" / "model.pt", "cpu")
    items, image_for = common.stylized_source(Namespace(data=toy_data, work=tmp_path / "w", source="gta5"))
    targets = common.target_train_items(toy_data)
    for domain, imgs in (("source", [(image_for(p), y) for p, y in items]), ("target", targets)):
        ref = copy.deepcopy(warm)
        common.recompute_bn_statistics(ref, common.bn_images(imgs, 3), "cpu")
        mean, var, _ = first_bn(ref)
        assert not torch.allclose(mean, first_bn(warm)[0])            # the statistics did change
        assert len(seen[domain]) > 0
        for m, v, training in seen[domain]:                           # every call, that domain's
            torch.testing.assert_close(m, mean)
            torch.testing.assert_close(v, var)
            assert not training                                       # eval mode: no batch statistics
    assert not torch.allclose(seen["source"][0][0], seen["target"][0][0])


def test_cli_rejects_conflicting_thresholds():
    with pytest.raises(SystemExit):
        M.parse_args(["--delta", "1", "--target-ratio", "0.5"])
    with pytest.raises(SystemExit):
        M.parse_args(["--pla", "confidence"])
    assert M.parse_args(["--source", "synthia"]).delta is None          # -> -50 (Sec. 4.2) at run time

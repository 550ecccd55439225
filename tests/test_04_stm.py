"""Tests of 04_stm.py: Eq. (7)-(9) on hand-checkable numbers, the encoder and K-means
pieces, and the stage end to end on the toy data (fresh run, resume, 03's labels)."""
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import load_stage, run_stage

M = load_stage("04_stm")
ROAD, SIDEWALK, SKY = 0, 1, 10


# ============ Eq. (7): nearest-prototype distance ============
def test_distance_to_nearest_prototype():
    f = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [6.0, 1.0]])
    A = torch.tensor([[0.0, 0.0], [6.0, 0.0]])
    # [3,4]: 5 to both; [6,8]: 10 or 8 -> 8; [6,1]: 1 to the second prototype
    assert M.nearest_prototype_distance(f, A).tolist() == pytest.approx([0.0, 5.0, 8.0, 1.0])


def test_distance_is_exact_for_large_features():
    """Large features with small distances (where |f|^2 - 2fA + |A|^2 cancels)."""
    A = torch.full((1, 2048), 1000.0)
    f = A.clone()
    f[0, 0] += 0.5
    assert M.nearest_prototype_distance(f, A).item() == pytest.approx(0.5, abs=1e-4)


# ============ Eq. (9): the distance term and the map ============
def test_distance_term_hand_values():
    d_mean = 3.0
    t = M.distance_term([0.0, 3.0, 6.0], d_mean)
    assert t[0] == 1.0
    assert t[1] == pytest.approx(0.5, abs=1e-15)          # D = d_mean -> exactly 1/2
    assert t[2] == pytest.approx(2.0 ** -4)                # D = 2 d_mean -> 2^-4


def test_transferability_map_clamp_and_ignore():
    d_mean = 2.0
    D = np.array([[0.0, 2.0, 2.0, 2.0, 4.0]])
    label = np.array([[SKY, ROAD, SIDEWALK, 255, ROAD]], np.uint8)
    e_norm = np.zeros(19)
    e_norm[ROAD], e_norm[SIDEWALK], e_norm[SKY] = 0.3, 0.7, 0.2
    w = M.transferability_map(D, label, e_norm, d_mean)
    # 1 + 0.2 -> clamp 1; 0.5 + 0.3; 0.5 + 0.7 -> clamp 1; ignored: 0.5 alone; 1/16 + 0.3
    assert w[0].tolist() == pytest.approx([1.0, 0.8, 1.0, 0.5, 0.0625 + 0.3], abs=1e-6)
    assert w.dtype == np.float32


def test_upsample_nearest():
    D = np.array([[1.0, 2.0], [3.0, 4.0]])
    up = M.upsample_nearest(D, (4, 6))
    assert up.tolist() == [[1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 2],
                           [3, 3, 3, 4, 4, 4], [3, 3, 3, 4, 4, 4]]
    assert M.upsample_nearest(D, (3, 3)).tolist() == [[1, 1, 2], [1, 1, 2], [3, 3, 4]]


def test_png_round_trip_within_one_step(tmp_path):
    w = np.random.default_rng(0).uniform(0, 1, (37, 53)).astype(np.float32)
    w[0, :3] = [0.0, 1.0, 0.5]
    common.save_png(tmp_path / "a.png", M.weight_to_u8(w))
    back = M.read_stm(tmp_path / "a.png")
    assert back.shape == w.shape and back.dtype == np.float32
    assert np.abs(back - w).max() <= 0.5 / 255 + 1e-7        # rounding: within half a step
    assert back[0, :2].tolist() == [0.0, 1.0]


def test_read_stm_errors(tmp_path):
    with pytest.raises(common.StageError, match="04_stm.py"):
        M.read_stm(tmp_path / "missing.png")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(common.DataError, match="single-channel"):
        M.read_stm(tmp_path / "rgb.png")


# ============ Eq. (8): class entropy ============
def test_normalized_entropy():
    C = 19
    logits = torch.full((1, C, 1, 3), -1e4)
    logits[0, :, 0, 0] = 0.0                 # uniform -> 1
    logits[0, 5, 0, 1] = 0.0                 # one-hot -> 0
    logits[0, 2:4, 0, 2] = 0.0               # two classes at 1/2 -> log 2 / log 19
    h = M.normalized_entropy(logits)[0, 0]
    assert h.tolist() == pytest.approx([1.0, 0.0, math.log(2) / math.log(C)], abs=1e-6)


def test_class_entropy_sums_and_means():
    ent = torch.tensor([[0.1, 0.3, 0.5], [0.9, 0.2, 0.4]])
    lab = torch.tensor([[0, 0, 2], [255, 2, 2]], dtype=torch.uint8)
    s, n = M.class_entropy_sums(ent, lab, 19)
    assert s[0].item() == pytest.approx(0.4) and s[2].item() == pytest.approx(1.1)
    assert n.tolist()[:3] == [2, 0, 3] and n.sum().item() == 5    # 255 left out
    e = M.class_entropy(s.numpy(), n.numpy())
    assert e[0] == pytest.approx(0.2) and e[2] == pytest.approx(1.1 / 3)
    assert np.isnan(e[1])


def test_min_max_normalisation_and_absent_class():
    e = np.full(19, np.nan)
    e[ROAD], e[SIDEWALK], e[SKY] = 0.2, 0.6, 0.4
    with pytest.warns(UserWarning, match="no target pixel"):
        en = M.normalize_class_entropy(e)
    assert en[ROAD] == 0.0                  # least uncertain class -> 0
    assert en[SIDEWALK] == 1.0              # most uncertain class -> 1
    assert en[SKY] == pytest.approx(0.5)
    absent = [c for c in range(19) if c not in (ROAD, SIDEWALK, SKY)]
    assert (en[absent] == 1.0).all()        # never degrade what cannot be judged


def test_min_max_over_the_source_classes_only():
    """SYNTHIA has no terrain/truck/train: their target entropy takes no part in Eq. (8)."""
    e = np.linspace(0.1, 0.9, 19)
    e[9] = 5.0                              # terrain: a huge entropy must not squash the rest
    en = M.normalize_class_entropy(e, common.EVAL_CLASSES["16"])
    assert en[9] == 1.0 and en[14] == 1.0 and en[16] == 1.0
    assert en[0] == 0.0 and en[18] == 1.0
    with pytest.warns(UserWarning) as rec:
        assert M.normalize_class_entropy([0.3, 0.3, np.nan]).tolist() == [0.0, 0.0, 1.0]
    assert {"same entropy" in str(w.message) for w in rec} == {True, False}   # and "no target pixel"


# ============ the encoder and the prototypes ============
def test_encoder_shapes_and_strict_loading(tmp_path):
    torch.manual_seed(0)
    x = torch.zeros(3, 64, 96, dtype=torch.uint8)
    enc = M.build_encoder("resnet18", "none")
    f, hw = M.encode(enc, x)
    assert f.shape == (2 * 3, 512) and hw == (2, 3)          # stride 32
    f16, hw16 = M.encode(M.build_encoder("resnet50", "none", stride=16), x)
    assert f16.shape == (4 * 6, 2048) and hw16 == (4, 6)     # stride 16 (dilated layer4)
    f18, hw18 = M.encode(M.build_encoder("resnet18", "none", stride=16), x)
    assert f18.shape == (4 * 6, 512) and hw18 == (4, 6)      # resnet18: layer4 dilated by hand
    _, hw2 = M.encode(enc, x, scale=2.0)
    assert hw2 == (4, 6)                                     # --encoder-scale
    for (W, H), scale in [((100, 70), 1.0), ((100, 70), 0.7), ((96, 64), 2.0)]:
        _, hw = M.encode(enc, torch.zeros(3, H, W, dtype=torch.uint8), scale=scale)
        assert M.feature_positions((W, H), scale, 32) == hw[0] * hw[1]
    import torchvision
    state = {k: v for k, v in torchvision.models.resnet18().state_dict().items()
             if not k.startswith("fc.")}                    # a headless backbone is fine
    torch.save(state, tmp_path / "ok.pth")
    loaded = M.build_encoder("resnet18", str(tmp_path / "ok.pth"))
    assert torch.equal(loaded[0].weight, state["conv1.weight"])
    del state["layer3.0.conv1.weight"]
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="layer3.0.conv1.weight"):
        M.build_encoder("resnet18", str(tmp_path / "bad.pth"))


def test_sample_quotas_spread_uniformly_and_never_exceed():
    assert M.sample_quotas(10, 4) == [3, 3, 2, 2]
    q = M.sample_quotas(1_000_000, 2975)                    # Cityscapes train
    assert q[:2] == [337, 337] and q[-1] == 336 and sum(q) == 1_000_000
    assert M.sample_quotas(2, 3) == [1, 1, 0]


def test_kmeans_finds_separated_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0], [10, 0, 0], [0, 10, 0]], np.float32)
    X = np.concatenate([c + rng.normal(0, 0.1, (200, 3)) for c in centres]).astype(np.float32)
    A, msd = M.target_prototypes(X, 3, seed=0, batch_size=64)
    assert A.shape == (3, 3) and A.dtype == np.float32
    found = sorted(map(tuple, np.round(A).astype(int).tolist()))
    assert found == [(0, 0, 0), (0, 10, 0), (10, 0, 0)]
    assert msd == pytest.approx(3 * 0.01, rel=0.2)           # 3 dims of variance 0.01
    with pytest.raises(ValueError, match="at least J"):
        M.target_prototypes(X[:2], 3, seed=0)


# ============ the stage end to end on the toy data ============
STM_ARGS = ["--encoder", "resnet18", "--encoder-weights", "none", "--encoder-scale", "2",
            "--clusters", "6", "--samples", "400", "--workers", "0", "--previews", "2"]


def run_stm(toy_data, work, *extra):
    """Run the stage; returns its manifest and the warnings it gave (the random encoder
    always warns loudly that it is not the paper's setting)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run_stage("04_stm", "--data", toy_data, "--work", work, *STM_ARGS, *extra)
    msgs = [str(w.message) for w in rec]
    assert any("NOT the paper's setting" in m for m in msgs)
    return json.loads((work / "04_stm" / "manifest.json").read_text()), msgs


@pytest.fixture(scope="module")
def stm_work(warmup_work, toy_data, tmp_path_factory):
    work = tmp_path_factory.mktemp("stm") / "work"
    shutil.copytree(warmup_work, work)
    shutil.rmtree(work / "03_maps", ignore_errors=True)
    run_stm(toy_data, work)
    return work


def test_stage_outputs(stm_work, toy_data):
    d = stm_work / "04_stm"
    m = json.loads((d / "manifest.json").read_text())
    s = m["summary"]
    assert m["complete"] and s["J"] == 6 and s["entropy_labels"] == "02_warmup argmax"
    assert np.load(d / "prototypes.npy").shape == (6, 512)
    items = common.source_items(toy_data, "gta5")
    assert s["images"] == len(items)

    # d_mean is the exact mean of D over every position of every source image
    maps = [np.load(d / "distance" / f"{p.stem}.npy") for p, _ in items]
    all_d = np.concatenate([x.ravel() for x in maps]).astype(np.float64)
    assert s["d_mean"] == pytest.approx(all_d.mean(), rel=1e-12)
    assert s["source_positions"] == all_d.size

    # Eq. (8) artifacts: e' spans [0, 1] over the present classes, absent classes at 1
    e, en = np.load(d / "class_entropy.npy"), np.load(d / "class_entropy_norm.npy")
    present = ~np.isnan(e)
    assert present.sum() >= 2 and en[present].min() == 0.0 and en[present].max() == 1.0
    assert (en[~present] == 1.0).all()
    assert np.load(d / "class_entropy_pixels.npy").sum() == sum(
        np.prod(common.image_size(p)) for p, _ in common.target_train_items(toy_data))

    # every STM has its label's size and is Eq. (9) of the saved D, e' and d_mean
    w_sum, n_sum = np.zeros(256), np.zeros(256)
    for (p, lab_p), D in zip(items, maps):
        lab = common.decode_label(lab_p, "gta5")
        w8 = np.asarray(Image.open(d / "stm" / p.name))        # the name 05 reads
        assert w8.shape == lab.shape and w8.dtype == np.uint8
        want = M.transferability_map(M.upsample_nearest(D, lab.shape), lab, en, s["d_mean"])
        assert np.abs(w8 / 255.0 - want).max() <= 0.5 / 255 + 1e-6
        w_sum += np.bincount(lab.ravel(), weights=w8.ravel() / 255.0, minlength=256)
        n_sum += np.bincount(lab.ravel(), minlength=256)
    for c, name in enumerate(common.CLASSES):
        got = s["stm_mean_per_class"][name]
        assert (got is None) if n_sum[c] == 0 else got == pytest.approx(w_sum[c] / n_sum[c], abs=1e-4)
    assert len(list((d / "previews").glob("*.png"))) == 2


def test_resume_redoes_only_missing_images(stm_work, toy_data):
    d = stm_work / "04_stm"
    before = json.loads((d / "manifest.json").read_text())["summary"]
    stms, dists = sorted((d / "stm").glob("*.png")), sorted((d / "distance").glob("*.npy"))
    old_w, old_d = np.asarray(Image.open(stms[0])), np.load(dists[1])
    stms[0].unlink()                                          # a kill before these were written
    dists[1].unlink()
    (d / "stm" / dists[1].name.replace(".npy", ".png")).unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in stms[1:] + [dists[0], d / "prototypes.npy"]
              if p.exists()}
    after = run_stm(toy_data, stm_work)[0]["summary"]
    assert after["resumed"] is True
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())   # kept, not rewritten
    assert np.array_equal(np.asarray(Image.open(stms[0])), old_w)
    assert np.array_equal(np.load(dists[1]), old_d)                    # same seed, same encoder
    assert after["d_mean"] == before["d_mean"]
    assert after["stm_mean_per_class"] == before["stm_mean_per_class"]


def test_entropy_grouped_by_03_pseudo_labels(warmup_work, toy_data, tmp_path):
    """When 03 has finished, its pseudo labels group the pixels of Eq. (8): here a
    hand-made 03 folder labels only the top 8 rows of each target image as road."""
    work = tmp_path / "work"
    shutil.copytree(warmup_work, work)
    with pytest.raises(common.StageError, match="03_maps"):
        run_stage("04_stm", "--data", toy_data, "--work", work, *STM_ARGS, "--entropy-labels", "maps")
    targets = common.target_train_items(toy_data)
    for p, _ in targets:
        w, h = common.image_size(p)
        lab = np.full((h, w), 255, np.uint8)
        lab[:8] = ROAD
        common.save_png(work / "03_maps" / "labels" / common.item_name(p), lab)
    warm = common.read_manifest(work, "02_warmup")
    manifest = {"stage": "03_maps", "complete": True, "run_id": "hand-made",
                "args": {"source": "gta5"}, "upstream": {"02_warmup": "another warm-up run"}}
    common.save_json(work / "03_maps" / "manifest.json", manifest)
    with pytest.raises(common.StageError, match="stale"):      # 03 made from another 02 run
        run_stage("04_stm", "--data", toy_data, "--work", work, *STM_ARGS)
    manifest["upstream"]["02_warmup"] = warm["run_id"]
    common.save_json(work / "03_maps" / "manifest.json", manifest)
    m, msgs = run_stm(toy_data, work)
    s = m["summary"]
    assert any("same entropy" in w for w in msgs)
    assert s["entropy_labels"] == "03_maps pseudo labels"
    px = s["class_entropy_pixels"]
    assert px["road"] == sum(8 * common.image_size(p)[0] for p, _ in targets)
    assert all(v == 0 for k, v in px.items() if k != "road")
    assert s["class_entropy_norm"]["road"] == 0.0               # one class: Eq. (8) is 0/0 -> 0
    assert all(v == 1.0 for k, v in s["class_entropy_norm"].items() if k != "road")
    assert s["stm_mean_per_class"]["sky"] == 1.0                # absent from target -> e' = 1

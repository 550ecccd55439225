"""Self-training losses and augmentation (05_selftrain.py, common.py), by hand."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import few_targets, load_stage, run_stage

st = load_stage("05_selftrain")
LOG2 = math.log(2)


def test_weighted_ce_eq10():
    logits = torch.zeros(1, 2, 1, 3)                     # p = 0.5 everywhere: -log p = log 2
    label = torch.tensor([[[0, 1, 255]]])
    w = torch.tensor([[[1.0, 0.5, 1.0]]])
    # (1 * log2 + 0.5 * log2) / 2 labelled pixels; the ignored pixel adds nothing
    assert common.weighted_ce(logits, label, w).item() == pytest.approx(1.5 * LOG2 / 2)
    assert common.weighted_ce(logits, label).item() == pytest.approx(LOG2)   # Eq. (2)
    logits = torch.tensor([[[[2.0]], [[0.0]]]])          # p_0 = e^2 / (e^2 + 1)
    assert common.weighted_ce(logits, torch.tensor([[[0]]]), torch.tensor([[[0.25]]])).item() == \
        pytest.approx(-0.25 * math.log(math.e ** 2 / (math.e ** 2 + 1)))


def test_symmetric_ce_eq11():
    logits = torch.zeros(1, 2, 1, 2)
    label = torch.tensor([[[0, 255]]])
    # CE = log 2; RCE = -(0.5 log 1 + 0.5 log 1e-4) = 0.5 * 9.2103 (the clamp at 1e-4)
    want = 0.1 * LOG2 + 1.0 * 0.5 * -math.log(1e-4)
    assert common.symmetric_ce(logits, label, 0.1, 1.0).item() == pytest.approx(want, rel=1e-6)
    # a confident correct prediction has RCE -> 0, CE -> 0
    sure = torch.tensor([[[[20.0]], [[-20.0]]]])
    assert common.symmetric_ce(sure, torch.tensor([[[0]]])).item() == pytest.approx(0, abs=1e-6)
    # all pixels ignored: zero, not NaN
    assert common.symmetric_ce(logits, torch.full((1, 1, 2), 255)).item() == 0


def test_kl_consistency_eq12():
    """Eq. (12) at the official scale: the per-pixel KL(p~ || p) divided by C (the mean
    over (pixel, class) elements of nn.KLDivLoss()), averaged over the kept pixels."""
    t = torch.zeros(1, 2, 1, 2)                                            # p~ = (0.5, 0.5)
    assert common.kl_divergence(t, t.clone()).item() == pytest.approx(0, abs=1e-7)
    s = torch.log(torch.tensor([0.25, 0.75])).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    want = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2  # / C, C = 2
    assert common.kl_divergence(t, s).item() == pytest.approx(want, rel=1e-6)
    # cut-out pixels are excluded: the mean is over kept pixels only
    s2 = s.clone()
    s2[..., 1] = torch.tensor([10.0, -10.0]).view(2, 1)                   # a wild pixel, masked out
    mask = torch.tensor([[[True, False]]])
    assert common.kl_divergence(t, s2, mask).item() == pytest.approx(want, rel=1e-6)


def test_kl_consistency_eq12_three_classes_and_mask():
    """C = 3, two kept pixels with different KLs and one cut-out pixel: the mean over
    the kept pixels of sum_c p~_c log(p~_c / p_c), divided by 3."""
    pt = [(0.5, 0.3, 0.2), (0.1, 0.1, 0.8), (1 / 3, 1 / 3, 1 / 3)]      # teacher, per pixel
    ps = [(0.2, 0.5, 0.3), (0.6, 0.3, 0.1), (0.98, 0.01, 0.01)]         # student, per pixel
    teach = torch.log(torch.tensor(pt)).T.reshape(1, 3, 1, 3)            # (B, C, H, W)
    stud = torch.log(torch.tensor(ps)).T.reshape(1, 3, 1, 3) + 7.0       # logits: any offset
    kl0 = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.5) + 0.2 * math.log(0.2 / 0.3)
    kl1 = 0.1 * math.log(0.1 / 0.6) + 0.1 * math.log(0.1 / 0.3) + 0.8 * math.log(0.8 / 0.1)
    kl2 = sum(1 / 3 * math.log((1 / 3) / q) for q in ps[2])
    keep = torch.tensor([[[True, True, False]]])                         # pixel 2 is cut out
    assert common.kl_divergence(teach, stud, keep).item() == pytest.approx((kl0 + kl1) / 2 / 3, rel=1e-5)
    assert common.kl_divergence(teach, stud).item() == pytest.approx((kl0 + kl1 + kl2) / 3 / 3, rel=1e-5)
    # a batch of two crops, masks per crop: the mean runs over the kept pixels of both
    teach2, stud2 = torch.cat([teach, teach.flip(-1)]), torch.cat([stud, stud.flip(-1)])
    keep2 = torch.tensor([[[True, False, False]], [[False, False, True]]])   # pixel 0, then pixel 0 flipped
    assert common.kl_divergence(teach2, stud2, keep2).item() == pytest.approx(kl0 / 3, rel=1e-5)
    # nothing kept: zero, not NaN
    assert common.kl_divergence(teach, stud, torch.zeros(1, 1, 3, dtype=torch.bool)).item() == 0


@pytest.mark.filterwarnings("ignore:reduction")     # torch's note on 'mean': the scale we want
def test_kl_consistency_eq12_is_kldivloss_mean_over_kept_pixels():
    """The scale lambda = 20 was tuned for: torch's nn.KLDivLoss() (reduction 'mean':
    every (pixel, class) element) on the kept pixels, student log-probabilities as input
    and teacher probabilities as target, as in the official consistency term
    (luyvlei/BiSMAPs models/adaptation_model.py, CustomModel.step)."""
    g = torch.Generator().manual_seed(0)
    teach, stud = torch.randn(2, 19, 6, 5, generator=g) * 3, torch.randn(2, 19, 6, 5, generator=g) * 3
    keep = torch.rand(2, 6, 5, generator=g) > 0.3
    ref = torch.nn.KLDivLoss()(stud.log_softmax(1).permute(0, 2, 3, 1)[keep],
                               teach.softmax(1).permute(0, 2, 3, 1)[keep])
    assert common.kl_divergence(teach, stud, keep).item() == pytest.approx(ref.item(), rel=1e-5)


def test_ema_update():
    teacher, student = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(0.0)
        student.running_mean.fill_(3.0)
    st.ema_update(teacher, student, 0.9)
    assert teacher.weight.tolist() == pytest.approx([0.9, 0.9])
    assert teacher.running_mean.tolist() == [3.0, 3.0]      # buffers follow the student


def test_ramp_up():
    assert st.ramp_up(0, 100) == pytest.approx(math.exp(-5))
    assert st.ramp_up(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert st.ramp_up(100, 100) == 1.0 and st.ramp_up(5, 0) == 1.0


@pytest.mark.parametrize("op", list(st.PHOTOMETRIC_OPS))
def test_photometric_ops_keep_pixel_positions(op):
    torch.manual_seed(0)
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[:, :, :8] = torch.tensor([40, 90, 200], dtype=torch.uint8).view(3, 1, 1)
    img[:, :, 8:] = torch.tensor([220, 120, 30], dtype=torch.uint8).view(3, 1, 1)
    img[:, 5, 3] = 255                                   # one marked pixel
    out = st.PHOTOMETRIC_OPS[op](img, 0.8)
    # regions that were uniform stay uniform (away from the edges, which sharpness may touch)
    right = out[:, :, 10:].flatten(1)
    marked = out[:, 5, 3].clone()
    keep = torch.ones(16, 6, dtype=torch.bool)
    keep[4:7, 2:5] = False
    assert (out[:, :, :6][:, keep] == out[:, 0, 0, None]).all()
    assert (right == right[:, :1]).all()
    if op not in ("identity",):
        assert out.shape == img.shape and out.dtype == torch.uint8
    # the marked pixel differs from its uniform neighbourhood wherever the op keeps contrast
    assert torch.equal(marked != out[:, 0, 0], (img[:, 5, 3] != img[:, 0, 0]) & (marked != out[:, 0, 0]))


def test_cutout_is_the_official_black_square():
    img = torch.full((3, 40, 60), 9, dtype=torch.uint8)
    inside = 0
    for seed in range(30):
        torch.manual_seed(seed)
        out, keep = st.cutout(img, 0.2)                   # side int(0.2 * 60) = 12 px
        rows, cols = (~keep).any(1).nonzero().flatten(), (~keep).any(0).nonzero().flatten()
        assert 0 < len(rows) <= 12 and 0 < len(cols) <= 12
        assert (~keep).sum() == len(rows) * len(cols)      # one axis-aligned box
        assert (out[:, ~keep] == 0).all() and (out[:, keep] == 9).all()
        if 0 < rows[0] and rows[-1] < 39 and 0 < cols[0] and cols[-1] < 59:
            assert len(rows) == len(cols) == 12            # unclipped: the full square
            inside += 1
    assert inside > 0


def test_rand_augment_official_ranges_and_probability():
    img = torch.full((3, 4, 4), 100, dtype=torch.uint8)
    assert (st.PHOTOMETRIC_OPS["brightness"](img, 0.1) == 14).all()          # factor 0.05 + 0.09
    assert (st.PHOTOMETRIC_OPS["posterize"](img + 3, 0.9) == 102).all()      # 7 bits: 103 -> 102
    assert (st.PHOTOMETRIC_OPS["solarize"](img * 2, 0.5) == 55).all()        # 200 >= 128 -> 55
    assert (st.PHOTOMETRIC_OPS["solarize"](img, 0.5) == 100).all()           # 100 < 128 kept
    torch.manual_seed(0)
    assert torch.equal(st.rand_augment(img, 2, 10, p=0.0), img)               # p = 0: never applied
    # p = 0.5 (official): over many draws of one op, about half leave a textured image alone
    tex = torch.arange(48, dtype=torch.uint8).view(3, 4, 4) * 5
    same = sum(torch.equal(st.rand_augment(tex, 1, 10), tex) for _ in range(400)) / 400
    n_id = 1 / len(st.PHOTOMETRIC_OPS)                   # identity leaves it alone when applied too
    assert abs(same - (0.5 + 0.5 * n_id)) < 0.1


def test_stm_map_follows_the_image_through_the_dataset(tmp_path):
    h, w = 30, 40
    xs = np.tile(np.arange(w, dtype=np.uint8) * 6, (h, 1))
    img = np.stack([xs, np.zeros_like(xs), np.zeros_like(xs)], -1)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray((np.arange(w, dtype=np.uint8)[None].repeat(h, 0) % 19)).save(tmp_path / "l.png")
    Image.fromarray(xs).save(tmp_path / "stm.png")
    ds = common.SegDataset([(tmp_path / "a.png", tmp_path / "l.png")], "trainid", crop=(24, 16),
                           scale=(0.5, 1.5), jitter=0.0, extra={"stm": lambda p: tmp_path / "stm.png"})
    for seed in range(8):
        torch.manual_seed(seed)
        b = ds[0]
        v = b["valid"]
        # same geometry: equal up to one source pixel (6 grey levels), since the image is
        # resized bilinearly and the map by nearest neighbour; a flip or shift would differ by far more
        assert (b["stm"][v].int() - b["image"][0][v].int()).abs().max() <= 6
        assert (b["label"][~v] == 255).all()


# ============ the EMA teacher's forward (issue 11: as in the official code) ============
def _mode_recorder(model):
    """Forward hooks on every BatchNorm2d and dropout module of `model`: each call appends
    (kind, module.training) to the returned list while the forward runs."""
    seen, handles = [], []
    for m in model.modules():
        kind = "bn" if isinstance(m, torch.nn.BatchNorm2d) else \
            "dropout" if isinstance(m, torch.nn.modules.dropout._DropoutNd) else None
        if kind:
            handles.append(m.register_forward_hook(lambda mod, i, o, k=kind: seen.append((k, mod.training))))
    return seen, handles


def test_teacher_forward_batch_norm_in_training_mode_and_dropout_off():
    torch.manual_seed(0)
    teacher = common.build_model("resnet18").eval()          # 05 keeps its teacher in eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    n_drop = sum(isinstance(m, torch.nn.modules.dropout._DropoutNd) for m in teacher.modules())
    assert n_bn > 0 and n_drop == 1                          # the Dropout2d before the classifier
    a, b, c = (torch.randn(1, 3, 64, 64) for _ in range(3))
    seen, handles = _mode_recorder(teacher)
    out_ab = common.teacher_forward(teacher, torch.cat([a, b]))[1]
    for h in handles:
        h.remove()
    # during the forward: every BN normalises with the batch's statistics, every dropout is off
    assert sorted(seen) == sorted([("bn", True)] * n_bn + [("dropout", False)] * n_drop)
    assert not out_ab.requires_grad
    # batch statistics: the same image in another batch gets other logits ...
    out_ac = common.teacher_forward(teacher, torch.cat([a, c]))[1]
    assert (out_ab[0] - out_ac[0]).abs().max() > 1e-3
    # ... which the running statistics would not give (the eval-mode check of the test itself)
    teacher.eval()
    with torch.no_grad():
        assert torch.allclose(teacher(torch.cat([a, b]))[1][0], teacher(torch.cat([a, c]))[1][0], atol=1e-4)
    # dropout off: two calls on the same batch agree exactly ...
    assert torch.equal(common.teacher_forward(teacher, torch.cat([a, b]))[1], out_ab)
    # ... where the model in plain training mode (dropout on) does not
    teacher.train()
    with torch.no_grad():
        assert not torch.equal(teacher(torch.cat([a, b]))[1], teacher(torch.cat([a, b]))[1])


def test_teacher_forward_running_statistics_switch():
    """--teacher-bn running: every BN normalises with its running statistics and every
    dropout is off, so an image's logits do not depend on the rest of the batch."""
    torch.manual_seed(0)
    teacher = common.build_model("resnet18").train()
    for m in teacher.modules():                     # running statistics that differ from a batch's
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    a, b, c = (torch.randn(1, 3, 64, 64) for _ in range(3))
    seen, handles = _mode_recorder(teacher)
    with torch.no_grad():
        out_ab = common.teacher_forward(teacher, torch.cat([a, b]), bn="running")[1]
    for h in handles:
        h.remove()
    assert sorted(seen) == sorted([("bn", False)] * n_bn + [("dropout", False)])
    with torch.no_grad():
        out_ac = common.teacher_forward(teacher, torch.cat([a, c]), bn="running")[1]
        assert torch.allclose(out_ab[0], out_ac[0], atol=1e-4)
        # and not what the official batch-statistics forward gives
        assert (common.teacher_forward(teacher, torch.cat([a, b]))[1][0] - out_ab[0]).abs().max() > 1e-3


# ============ the learning-rate warm-up (issue 11) ============
def test_poly_lr_with_linear_warmup():
    # it < W: base * (it + 1) / W; then the poly schedule of the whole run, base * (1 - it/T)^p
    assert [common.poly_lr(2.0, it, 100, 0.9, warmup=4) for it in range(4)] == \
        pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert common.poly_lr(2.0, 4, 100, 0.9, warmup=4) == pytest.approx(2.0 * (1 - 4 / 100) ** 0.9)
    assert common.poly_lr(2.0, 60, 100, 0.9, warmup=4) == pytest.approx(2.0 * 0.4 ** 0.9)
    assert common.poly_lr(2.0, 0, 100, 0.9, warmup=0) == 2.0                  # no warm-up
    lrs = [common.poly_lr(1.0, it, 90000, 0.9, warmup=400) for it in range(400)]
    assert lrs[0] == pytest.approx(1 / 400) and lrs[-1] == pytest.approx(1.0)
    assert all(x < y for x, y in zip(lrs, lrs[1:]))                           # rises linearly


def test_official_fraction():
    assert common.official_fraction(90000, 400) == 400                       # the official schedule
    assert common.official_fraction(90000, 4000) == 4000
    assert common.official_fraction(900, 400) == 4                           # 400 * 900 / 90000
    assert common.official_fraction(900, 4000) == 40
    assert common.official_fraction(45000, 400) == 200
    assert common.official_fraction(10, 400) == 1                            # at least one iteration
    assert common.official_fraction(900, 0) == 0                             # none stays none


def _resolved_args(script, monkeypatch, tmp_path, *argv):
    """The arguments a stage script resolves before it starts (seen by common.start); the
    empty work folder then stops it at its first upstream manifest."""
    got = {}
    real = common.start

    def spy(args, name):
        got.update(vars(args))
        return real(args, name)
    monkeypatch.setattr(common, "start", spy)
    with pytest.raises(common.StageError, match="run 02_warmup.py first"):
        load_stage(script).main(["--data", str(tmp_path), "--work", str(tmp_path / "work"), *argv])
    return got


def test_warmup_and_ramp_up_default_to_the_official_fractions(monkeypatch, tmp_path):
    a = _resolved_args("05_selftrain", monkeypatch, tmp_path, "--iters", "900")
    assert a["warmup_iters"] == 4 and a["ramp_up"] == 40
    a = _resolved_args("05_selftrain", monkeypatch, tmp_path, "--iters", "90000")
    assert a["warmup_iters"] == 400 and a["ramp_up"] == 4000
    a = _resolved_args("05_selftrain", monkeypatch, tmp_path, "--iters", "900",
                       "--warmup-iters", "7", "--ramp-up", "0", "--ema", "0.5")
    assert a["warmup_iters"] == 7 and a["ramp_up"] == 0 and a["ema"] == 0.5  # given values are kept


def test_ema_decay_keeps_the_official_time_constant_as_a_fraction_of_the_schedule(monkeypatch, tmp_path):
    # official: 0.999 = a time constant of 1 / (1 - 0.999) = 1,000 of 90,000 iterations
    assert st.ema_decay_for(90000) == pytest.approx(0.999)
    assert st.ema_decay_for(900) == pytest.approx(0.9)          # 10 iterations: 1 - 1/10
    assert st.ema_decay_for(600) == pytest.approx(1 - 1 / 7)    # 6.67 -> 7 iterations
    assert st.ema_decay_for(30) == 0.0                          # under one iteration: the student itself
    assert _resolved_args("05_selftrain", monkeypatch, tmp_path, "--iters", "900")["ema"] == pytest.approx(0.9)
    assert _resolved_args("05_selftrain", monkeypatch, tmp_path, "--iters", "90000")["ema"] == pytest.approx(0.999)
    with pytest.raises(common.StageError, match=r"--ema: expected a decay in \[0, 1\), got 1.0"):
        load_stage("05_selftrain").main(["--data", str(tmp_path), "--work", str(tmp_path / "w"), "--ema", "1"])


# ============ one real 05 run on the toy data, watched by hooks ============
BATCH = 2


@pytest.fixture(scope="module")
def selftrain(warmup_work, toy_data, tmp_path_factory):
    """05 for 2 iterations on the toy data (2 target train and val images) after the tiny
    warm-up, with hand-made 03 and 04 outputs (the ground truth as pseudo labels; a
    constant STM weight): the forwards do not depend on their values. Hooks on the
    student and on the EMA teacher record every forward: the step it belongs to, the
    input batch, and the mode of every BatchNorm2d and dropout module during it.
    Returns (work folder, records, models)."""
    tmp = tmp_path_factory.mktemp("selftrain")
    data, work = few_targets(toy_data, tmp / "data"), tmp / "work"
    shutil.copytree(warmup_work, work, ignore=shutil.ignore_patterns("last.pt", "best.pt", "0[3-6]_*"))
    warm = common.read_manifest(work, "02_warmup")
    for p, lab in common.cityscapes_items(data, "train"):
        common.save_png(work / "03_maps" / "labels" / common.item_name(p), common.decode_label(lab, "cityscapes"))
    for p, lab in common.source_items(data, "gta5"):
        h, w = common.decode_label(lab, "gta5").shape
        common.save_png(work / "04_stm" / "stm" / common.item_name(p), np.full((h, w), 200, np.uint8))
    for name, up in (("03_maps", {}), ("04_stm", {"03_maps": "hand-made 03_maps"})):
        common.save_json(work / name / "manifest.json", {   # 04 made from this 03, as 05 checks
            "stage": name, "complete": True, "run_id": f"hand-made {name}", "args": {"source": "gta5"},
            "upstream": {"02_warmup": warm["run_id"], **up}})

    calls, models, step, watching = [], {}, [None], [True]

    def watch(model, who):
        def pre(m, inp):
            calls.append({"who": who, "step": step[0], "x": inp[0].detach().clone(),
                          "grad": torch.is_grad_enabled(), "bn": [], "dropout": [], "momentum": []})
        model.register_forward_pre_hook(pre)
        for m in model.modules():
            kind = "bn" if isinstance(m, torch.nn.BatchNorm2d) else \
                "dropout" if isinstance(m, torch.nn.modules.dropout._DropoutNd) else None
            if kind:
                m.register_forward_hook(lambda mod, i, o, k=kind: calls[-1][k].append(mod.training))
            if kind == "bn":
                m.register_forward_hook(lambda mod, i, o: calls[-1]["momentum"].append(mod.momentum))

    real_loop = common.train_loop

    def spy_loop(args, out_dir, model, step_loss, *a, **kw):
        run = models if watching[0] else models.setdefault("warmup", {})
        run["start"] = {k: v.clone() for k, v in model.state_dict().items()}
        run["teacher_start"] = {k: v.clone() for k, v in kw["also_eval"]["teacher"].state_dict().items()}
        if not watching[0]:
            return real_loop(args, out_dir, model, step_loss, *a, **kw)
        models["student"], models["teacher"] = model, kw["also_eval"]["teacher"]
        watch(model, "student")
        watch(models["teacher"], "teacher")

        def step_loss_marked(it):
            step[0] = it
            try:
                return step_loss(it)
            finally:
                step[0] = None
        return real_loop(args, out_dir, model, step_loss_marked, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "train_loop", spy_loop)
        run_stage("05_selftrain", "--data", data, "--work", work, "--iters", "2", "--batch-size", BATCH,
                  "--crop", "64", "32", "--workers", "0", "--eval-every", "2", "--log-every", "1",
                  "--bn-images", "500")
        # the same run with --init warmup, in a copy of the work folder (not watched)
        watching[0] = False
        work2 = tmp / "work_init_warmup"
        shutil.copytree(work, work2, ignore=shutil.ignore_patterns("05_*"))
        run_stage("05_selftrain", "--data", data, "--work", work2, "--iters", "2", "--batch-size", BATCH,
                  "--crop", "64", "32", "--workers", "0", "--eval-every", "2", "--log-every", "1",
                  "--init", "warmup")
    return work, calls, models


def test_selftrain_retrains_from_the_warmups_initialisation(selftrain, warmup_work):
    """--init retrain (default; official configs/gta5_st.yml: resume_flag False): the
    student starts from 02's initialisation (--weights none here: random weights, as 02's
    own start), not from 02's trained model; --init warmup starts from 02's model.pt. In
    both the EMA teacher starts as a copy of the student."""
    work, _, models = selftrain
    trained = common.load_checkpoint(warmup_work / "02_warmup" / "model.pt")["model"]
    fresh = common.build_model(common.read_manifest(warmup_work, "02_warmup")["args"]["backbone"])
    start, warm = models["start"], models["warmup"]["start"]
    assert set(start) == set(trained) == set(fresh.state_dict())
    convs = [k for k, v in trained.items() if k.endswith("weight") and v.dim() == 4]
    assert convs and not any(torch.equal(start[k], trained[k]) for k in convs)  # not 02's trained weights
    bn = [k for k in trained if k.endswith("running_var")]
    assert all(torch.equal(start[k], torch.ones_like(start[k])) for k in bn)   # a fresh network's statistics
    assert all(torch.equal(warm[k], trained[k]) for k in trained)               # --init warmup: 02's model
    for run in (models, models["warmup"]):
        assert all(torch.equal(run["start"][k], run["teacher_start"][k]) for k in trained)
    m = json.loads((work / "05_selftrain" / "manifest.json").read_text())
    assert m["summary"]["init"] == "retrain" and m["args"]["init"] == "retrain"
    assert m["summary"]["ema"] == 0.0 == st.ema_decay_for(2)     # 2 iterations: the official fraction


def test_selftrain_teacher_runs_on_batch_statistics_with_dropout_off(selftrain):
    work, calls, models = selftrain
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in models["teacher"].modules())
    for it in range(2):
        teach = [c for c in calls if c["who"] == "teacher" and c["step"] == it]
        assert len(teach) == 1                                  # one teacher forward per step
        c = teach[0]
        assert not c["grad"] and c["x"].shape[0] == BATCH
        assert c["bn"] == [True] * n_bn                         # the target batch's statistics
        assert c["dropout"] == [False]                          # the Dropout2d is off
    # evaluated on val (the manifest's teacher_target_miou): running statistics, eval mode;
    # the re-estimation of its statistics before the final evaluation (--bn-images) runs in
    # training mode with momentum None (torch's update_bn)
    after = [c for c in calls if c["who"] == "teacher" and c["step"] is None]
    recal = [c for c in after if c["momentum"] == [None] * n_bn]
    ev = [c for c in after if c["momentum"] != [None] * n_bn]
    assert recal and all(all(c["bn"]) for c in recal)
    assert ev and all(not any(c["bn"]) and not any(c["dropout"]) for c in ev)


def test_selftrain_records_the_teachers_val_miou(selftrain):
    """The manifest's teacher_target_miou (and the log's) is the saved EMA teacher's
    target-val mIoU, evaluated here again from model.pt."""
    work, _, _ = selftrain
    s = json.loads((work / "05_selftrain" / "manifest.json").read_text())["summary"]
    ck = common.load_checkpoint(work / "05_selftrain" / "model.pt")
    teacher = common.build_model(ck["args"]["backbone"])
    common.load_state_strict(teacher, ck["extra"]["teacher"], what="05's EMA teacher")
    cm = common.evaluate(teacher, common.target_val_items(work.parent / "data"), "cityscapes",
                         torch.device("cpu"), "gta5")
    assert s["teacher_target_miou"] == pytest.approx(common.summarize_iou(cm, "gta5")["miou"], abs=1e-9)
    logged = [json.loads(x) for x in (work / "05_selftrain" / "log.jsonl").read_text().splitlines()]
    assert [r["val"]["teacher_miou"] for r in logged if "val" in r] == [s["teacher_target_miou"]]


def test_selftrain_student_forwards_each_view_separately(selftrain):
    _, calls, _ = selftrain
    for it in range(2):
        stud = [c for c in calls if c["who"] == "student" and c["step"] == it]
        teach = [c for c in calls if c["who"] == "teacher" and c["step"] == it][0]
        # three forwards with gradients, each a batch of one view, in the official order:
        # source, phi(target), clean target (last: most weight in the running statistics)
        assert len(stud) == 3 and all(c["grad"] for c in stud)
        assert [c["x"].shape[0] for c in stud] == [BATCH] * 3
        assert all(c["bn"] and all(c["bn"]) for c in stud)     # training mode, batch statistics
        src, aug, clean = (c["x"] for c in stud)
        assert torch.equal(clean, teach["x"])                   # the teacher sees the clean view
        # the teacher runs before the student's phi forward, as in the official step
        order = [c["who"] for c in calls if c["step"] == it]
        assert order == ["student", "teacher", "student", "student"]
        assert not torch.equal(aug, clean) and aug.shape == clean.shape
        assert not torch.equal(src, clean)
        # --bn-stats target (default): only the clean target batch moves the running
        # statistics that evaluation and export use; source and phi(target) leave them alone
        n_bn = len(stud[0]["bn"])
        assert [c["momentum"] for c in stud] == [[0.0] * n_bn, [0.0] * n_bn, [0.1] * n_bn]


def test_frozen_bn_statistics_keeps_running_statistics_and_uses_batch_ones():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3).train()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bn)
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    with common.frozen_bn_statistics(model):
        y = model(x)
    assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.running_var, var0)
    h = model[0](x)                                       # normalised with this batch's statistics
    ref = (h - h.mean((0, 2, 3), keepdim=True)) / (h.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    assert torch.allclose(y, ref, atol=1e-5)
    assert bn.momentum == 0.1                             # restored
    with pytest.raises(RuntimeError), common.frozen_bn_statistics(model):
        raise RuntimeError("a failing forward")
    assert bn.momentum == 0.1                             # restored after an error too
    model(x)
    assert not torch.equal(bn.running_mean, mean0)        # outside, forwards move them again


def test_bn_images_are_evenly_spaced():
    items = [(f"img{k}.png", None) for k in range(10)]
    assert common.bn_images(items, 4) == [items[0], items[2], items[5], items[7]]
    assert common.bn_images(items, 10) == items == common.bn_images(items, 500)
    assert common.bn_images(items, 0) == [] == common.bn_images([], 3)


def test_recompute_bn_statistics_by_hand(tmp_path):
    """Five 2x2 images of one grey value each (0, 51, 102, 153, 204 in every channel), in
    batches of 2: (0, 51), (102, 153) and the lone 204 with its mirror image (204, 204).
    After normalize(), channel c holds (v / 255 - m_c) / s_c. Each batch's mean and
    unbiased variance (8 values: 4 of each image) by hand; the running statistics are their
    plain average over the three batches (momentum None), as torch's update_bn computes them."""
    vals = [0, 51, 102, 153, 204]
    items = []
    for k, v in enumerate(vals):
        common.save_png(tmp_path / f"{k}.png", np.full((2, 2, 3), v, np.uint8))
        items.append((tmp_path / f"{k}.png", None))
    bn = torch.nn.BatchNorm2d(3)
    conv = torch.nn.Conv2d(3, 3, 1)
    model = torch.nn.Sequential(conv, bn).eval()
    w0 = {k: v.clone() for k, v in conv.state_dict().items()}
    with torch.no_grad():
        conv.weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        conv.bias.zero_()
        bn.running_mean.fill_(7.0)
    assert common.recompute_bn_statistics(model, items, "cpu", batch_size=2) == 5
    mean, std = torch.tensor(common.IMAGENET_MEAN), torch.tensor(common.IMAGENET_STD)
    m_b, v_b = [], []
    for a, b in ((0, 51), (102, 153), (204, 204)):
        xa, xb = (a / 255 - mean) / std, (b / 255 - mean) / std      # (3,) per channel
        m = (xa + xb) / 2
        m_b.append(m)
        v_b.append(((xa - m) ** 2 * 4 + (xb - m) ** 2 * 4) / 7)        # unbiased over 8 values
    assert torch.allclose(bn.running_mean, sum(m_b) / 3, atol=1e-6)
    assert torch.allclose(bn.running_var, sum(v_b) / 3, atol=1e-6)
    assert not model.training and bn.momentum == 0.1                   # mode and momentum restored
    assert torch.equal(conv.weight, torch.eye(3).view(3, 3, 1, 1))      # no weight moved
    assert not torch.equal(conv.weight, w0["weight"])
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        common.recompute_bn_statistics(model, items, "cpu", batch_size=1)


def test_selftrain_saves_statistics_re_estimated_on_the_target_images(selftrain):
    """--bn-images 500 (the default, 0, keeps the running averages, as the official code;
    the toy fixture has 2 target training images): the saved
    student's weights are those of the last iteration (last.pt, written before the final
    evaluation) and its batch norm statistics are last.pt's model re-estimated on those
    images; the manifest's target_miou is that model's, running_bn_target_miou last.pt's."""
    work, _, _ = selftrain
    s = json.loads((work / "05_selftrain" / "manifest.json").read_text())["summary"]
    data = work.parent / "data"
    targets = common.target_train_items(data)
    assert s["bn_images"] == len(targets) == 2
    final = common.load_checkpoint(work / "05_selftrain" / "model.pt")
    last = common.load_checkpoint(work / "05_selftrain" / "last.pt")
    model = common.build_model(final["args"]["backbone"])
    common.load_state_strict(model, last["model"], what="last.pt")
    val = common.target_val_items(data)

    def miou(m):
        cm = common.evaluate(m, val, "cityscapes", torch.device("cpu"), "gta5")
        return common.summarize_iou(cm, "gta5")["miou"]
    assert s["running_bn_target_miou"] == pytest.approx(miou(model), abs=1e-9)
    common.recompute_bn_statistics(model, targets, "cpu")
    got = model.state_dict()
    for k, v in final["model"].items():
        assert torch.allclose(got[k].float(), v.float(), atol=1e-6), k
    stats = [k for k in got if k.endswith("running_mean")]
    assert stats and not all(torch.equal(last["model"][k], final["model"][k]) for k in stats)
    assert s["target_miou"] == pytest.approx(miou(model), abs=1e-9)


def test_selftrain_manifest_records_the_resolved_schedule(selftrain):
    work, _, _ = selftrain
    m = json.loads((work / "05_selftrain" / "manifest.json").read_text())
    # --warmup-iters / --ramp-up not given: the official fractions of a 2-iteration run
    assert m["args"]["warmup_iters"] == common.official_fraction(2, 400) == 1
    assert m["args"]["ramp_up"] == common.official_fraction(2, 4000) == 1


def test_selftrain_retrain_under_torchrun_gives_every_rank_the_same_teacher(selftrain, tmp_path):
    """--init retrain under torchrun (2 gloo processes): each rank draws its own random
    start, DDP broadcasts rank 0's, and every rank's EMA teacher must start as that
    broadcast student, not as its own draw."""
    work = selftrain[0]
    w = tmp_path / "w"
    shutil.copytree(work, w, ignore=shutil.ignore_patterns("05_*"))
    data = work.parent / "data"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           str(Path(__file__).parent / "ddp_selftrain_spy.py"), "--data", str(data), "--work", str(w),
           "--device", "cpu", "--iters", "1", "--batch-size", "2", "--crop", "64", "32", "--workers", "0",
           "--eval-every", "1", "--log-every", "1"]
    out = subprocess.run(cmd, cwd=Path(__file__).parent.parent, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: teacher is the student True; teachers equal across ranks True" in out.stdout

"""Distillation (06_distill.py): the KL term, the official form, flip-averaged labels."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import numpy as np
from PIL import Image

import common
from conftest import few_targets, load_stage, run_stage

ds = load_stage("06_distill")


def test_kl_zero_when_student_equals_teacher_and_hand_value():
    t = torch.randn(2, 19, 3, 4)
    assert ds.distill_kl(t, t.clone()).item() == pytest.approx(0, abs=1e-6)
    teach = torch.log(torch.tensor([0.5, 0.5])).view(1, 2, 1, 1)
    stud = torch.log(torch.tensor([0.2, 0.8])).view(1, 2, 1, 1)
    # the official scale: the per-pixel KL divided by C = 2
    want = (0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)) / 2
    assert ds.distill_kl(teach, stud).item() == pytest.approx(want, rel=1e-6)
    # the same as torch's kl_div used as documented (log q as input, p as target), averaged
    # over every (pixel, class) element
    ref = F.kl_div(stud.log_softmax(1), teach.softmax(1), reduction="none").mean()
    assert ds.distill_kl(teach, stud).item() == pytest.approx(ref.item(), rel=1e-6)


def test_kl_three_classes_with_padding_mask():
    teach = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])).T.reshape(1, 3, 1, 2)
    stud = torch.log(torch.tensor([[0.25, 0.25, 0.5], [0.9, 0.05, 0.05]])).T.reshape(1, 3, 1, 2)
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    valid = torch.tensor([[[True, False]]])                   # pixel 1 is padding
    assert ds.distill_kl(teach, stud, valid).item() == pytest.approx(kl0 / 3, rel=1e-5)


def test_official_form_reproduced():
    teach = torch.log(torch.tensor([0.5, 0.5])).view(1, 2, 1, 1)
    stud = torch.log(torch.tensor([0.2, 0.8])).view(1, 2, 1, 1)
    # kl_div(input = p_s, target = p_t) = p_t (log p_t - p_s) per element (probabilities used
    # as logs), averaged over the C = 2 elements of the pixel
    want = (0.5 * (math.log(0.5) - 0.2) + 0.5 * (math.log(0.5) - 0.8)) / 2
    assert ds.distill_kl(teach, stud, official=True).item() == pytest.approx(want, rel=1e-6)
    # and it is not a divergence: it is not 0 when the student equals the teacher
    assert ds.distill_kl(teach, teach.clone(), official=True).item() == pytest.approx(
        (math.log(0.5) - 0.5) / 2, rel=1e-6)
    # three classes, two pixels, one of them padding (left out of the mean)
    teach = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])).T.reshape(1, 3, 1, 2)
    stud = torch.log(torch.tensor([[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])).T.reshape(1, 3, 1, 2)
    want = (0.5 * (math.log(0.5) - 0.2) + 0.3 * (math.log(0.3) - 0.5) + 0.2 * (math.log(0.2) - 0.3)) / 3
    got = ds.distill_kl(teach, stud, torch.tensor([[[True, False]]]), official=True)
    assert got.item() == pytest.approx(want, rel=1e-5)


def _official_distillation_term(target_outputUp, teacher_out):
    """Test oracle: the distillation term of the official code, transcribed literally
    (luyvlei/BiSMAPs models/adaptation_model.py, CustomModel.step, the
    `if self.cfg.training.distillation:` branch; the teacher's forward and the
    interpolation to the student's size are left out: the logits come in at one size)."""
    student = F.softmax(target_outputUp, dim=1)
    teacher = F.softmax(teacher_out, dim=1)
    loss_kd = F.kl_div(student, teacher, reduction='none')
    mask = (teacher != 250).float()
    loss_kd = (loss_kd * mask).sum() / mask.sum()
    return loss_kd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_kl_equals_the_official_expression(seed):
    g = torch.Generator().manual_seed(seed)
    stud = torch.randn(2, 19, 9, 13, generator=g) * 4
    teach = torch.randn(2, 19, 9, 13, generator=g) * 4
    want = _official_distillation_term(stud, teach).item()
    assert ds.distill_kl(teach, stud, official=True).item() == pytest.approx(want, rel=1e-5)
    # 06 passes the crop's valid mask; without padding it changes nothing
    full = torch.ones(2, 9, 13, dtype=torch.bool)
    assert ds.distill_kl(teach, stud, full, official=True).item() == pytest.approx(want, rel=1e-5)
    # with padding (the last 4 columns): the official value on the valid part
    valid = full.clone()
    valid[..., 9:] = False
    want_valid = _official_distillation_term(stud[..., :9], teach[..., :9]).item()
    assert ds.distill_kl(teach, stud, valid, official=True).item() == pytest.approx(want_valid, rel=1e-5)


def test_flip_averaged_pseudo_labels_are_flip_equivariant():
    torch.manual_seed(0)
    model = common.build_model("resnet18").eval()
    img = torch.randint(0, 256, (1, 3, 48, 72), dtype=torch.uint8)
    p = ds.teacher_probs(model, img)
    pf = ds.teacher_probs(model, img.flip(-1))
    assert torch.allclose(pf, p.flip(-1), atol=1e-6)
    lab, labf = ds.pseudo_label(p.clone()), ds.pseudo_label(pf.clone())
    assert (labf == lab[:, ::-1]).all()


def test_confidence_threshold():
    prob = torch.tensor([[0.9, 0.45], [0.1, 0.55]]).view(1, 2, 1, 2)
    assert ds.pseudo_label(prob.clone(), 0.6).tolist() == [[0, 255]]
    assert ds.pseudo_label(prob.clone(), 0.0).tolist() == [[0, 1]]
    # ProDA's 0.95: a confidence equal to it is ignored (conf <= threshold)
    prob = torch.tensor([[0.95, 0.96, 0.5], [0.05, 0.04, 0.5]]).view(1, 2, 1, 3)
    assert ds.pseudo_label(prob.clone(), 0.95).tolist() == [[255, 0, 255]]
    # the default is the official code's 0: every pixel labelled
    assert ds.pseudo_label(prob.clone()).tolist() == [[0, 0, 0]]


def test_teacher_averages_logits_over_flips_and_scales():
    """The official inference.py averages the teacher's logits (not its probabilities)
    over scales and flips. softmax(mean of log p_s) = softmax(mean of the logits), since
    each log p_s is its logits minus a per-pixel constant: so the 2-scale result must equal
    the softmax of the mean of the single-scale log-probabilities, and must differ from
    the mean of the single-scale probabilities."""
    torch.manual_seed(0)
    model = common.build_model("resnet18").eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight *= 300                   # confident logits: the two averages differ
    img = torch.randint(0, 256, (1, 3, 48, 72), dtype=torch.uint8)
    lo = [common.predict_logits(model, x)[0] for x in (img, img.flip(-1))]
    want = ((lo[0] + lo[1].flip(-1)) / 2).softmax(0)
    assert torch.allclose(ds.teacher_probs(model, img)[0], want, atol=1e-6)
    assert not torch.allclose(want, (lo[0].softmax(0) + lo[1].flip(-1).softmax(0)) / 2, atol=1e-4)
    one = [ds.teacher_probs(model, img, scales=(s,)) for s in (1.0, 0.5)]
    both = ds.teacher_probs(model, img, scales=(1.0, 0.5))
    assert torch.allclose(both, ((one[0].log() + one[1].log()) / 2).softmax(1), atol=1e-5)
    assert not torch.allclose(both, (one[0] + one[1]) / 2, atol=1e-4)


def test_bn_images_must_not_be_negative(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ds.main(["--data", str(tmp_path), "--work", str(tmp_path / "w"), "--bn-images", "-1"])
    assert e.value.code == 2
    assert "--bn-images must be a number >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


# ============ the lr warm-up default (issue 11) ============
def test_warmup_iters_default_to_the_official_fraction(monkeypatch, tmp_path):
    got, real = {}, common.start

    def spy(args, name):                                      # the arguments 06 resolved
        got.update(vars(args))
        return real(args, name)
    monkeypatch.setattr(common, "start", spy)
    for iters, want in (("900", 4), ("90000", 400)):
        with pytest.raises(common.StageError, match="run 05_selftrain.py first"):   # empty work folder
            ds.main(["--data", str(tmp_path), "--work", str(tmp_path / "work"), "--iters", iters])
        assert got["warmup_iters"] == want


# ============ --student-init warmup on the toy data ============
@pytest.fixture(scope="module")
def distill(warmup_work, toy_data, tmp_path_factory):
    """06 --student-init warmup for one round of one iteration on the toy data (2 target
    train and val images) after the tiny warm-up, with a hand-made 05 whose model is the
    warm-up model (06 only reads it as the teacher). Returns (data folder, work folder,
    the student's state dict as 06 hands it to training)."""
    tmp = tmp_path_factory.mktemp("distill")
    data, work = few_targets(toy_data, tmp / "data"), tmp / "work"
    shutil.copytree(warmup_work, work, ignore=shutil.ignore_patterns("last.pt", "best.pt", "0[3-6]_*"))
    warm = common.read_manifest(work, "02_warmup")
    (work / "05_selftrain").mkdir()
    shutil.copy(work / "02_warmup" / "model.pt", work / "05_selftrain" / "model.pt")
    common.save_json(work / "05_selftrain" / "manifest.json", {
        "stage": "05_selftrain", "complete": True, "run_id": "hand-made 05",
        "args": {"backbone": warm["args"]["backbone"]}, "summary": {"target_miou": 0.0},
        "upstream": {"02_warmup": warm["run_id"]}})
    return data, work, distill_recording_starts(data, work, "warmup")


def upstream_copy(work, tmp_path):
    """A copy of the fixture's work folder without its 06 run, for a 06 run of its own."""
    w = tmp_path / "work"
    shutil.copytree(work, w, ignore=shutil.ignore_patterns("06_*"))
    return w


def distill_recording_starts(data, work, init, *extra, rounds=1):
    """06 --student-init INIT (and `extra` flags), `rounds` rounds of one iteration; returns
    the student's state dict as 06 hands it to training, per round."""
    starts, real_loop = [], common.train_loop

    def spy_loop(args, out_dir, model, *a, **kw):
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_loop(args, out_dir, model, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "train_loop", spy_loop)
        run_stage("06_distill", "--data", data, "--work", work, "--student-init", init, "--no-stm",
                  "--rounds", str(rounds), "--iters", "1", "--eval-every", "1", "--batch-size", "2",
                  "--crop", "64", "32", "--workers", "0", "--bn-images", "500", *extra)
    return starts


def test_student_init_warmup_takes_the_warmup_backbone_and_a_fresh_head(distill):
    _, work, starts = distill
    assert len(starts) == 1
    student = starts[0]
    warm = common.load_checkpoint(work / "02_warmup" / "model.pt")["model"]
    assert student.keys() == warm.keys()
    backbone = [k for k in warm if k.startswith("backbone.")]
    head = [k for k in warm if not k.startswith("backbone.") and not k.endswith("num_batches_tracked")]
    assert backbone and head
    for k in backbone:                                        # every tensor of 02's backbone
        assert torch.equal(student[k], warm[k]), k
    for k in head:                                            # the head starts fresh (random)
        assert not torch.equal(student[k], warm[k]), k
    m = json.loads((work / "06_distill" / "manifest.json").read_text())
    assert m["summary"]["student_init"] == "warmup"
    assert m["args"]["warmup_iters"] == common.official_fraction(1, 400) == 1   # resolved, recorded


@pytest.mark.parametrize("init, source", [("warmup", "02"), ("teacher", "05")])
def test_student_init_refuses_another_backbone(distill, init, source):
    data, work, _ = distill
    with pytest.raises(common.StageError, match=f"{source}'s backbone is resnet18 but the student's is resnet34"):
        run_stage("06_distill", "--data", data, "--work", work, "--student-init", init,
                  "--backbone", "resnet34", "--no-stm", "--rounds", "1", "--iters", "1", "--workers", "0")
    # refused before anything was touched: the finished run is still there
    assert json.loads((work / "06_distill" / "manifest.json").read_text())["complete"]
    assert (work / "06_distill" / "model.pt").exists()


def test_student_init_warmup_full_takes_the_whole_warmup_network(distill, tmp_path):
    """--student-init warmup-full: every tensor of 02's model, head included."""
    data, work, _ = distill
    w = upstream_copy(work, tmp_path)
    starts = distill_recording_starts(data, w, "warmup-full")
    warm = common.load_checkpoint(w / "02_warmup" / "model.pt")["model"]
    assert len(starts) == 1 and starts[0].keys() == warm.keys()
    for k in warm:
        assert torch.equal(starts[0][k], warm[k]), k
    m = json.loads((w / "06_distill" / "manifest.json").read_text())
    assert m["summary"]["student_init"] == "warmup-full"
    assert m["summary"]["rounds"][0]["student_init"]["spec"] == "warmup-full"


def test_student_init_teacher_starts_each_round_as_a_copy_of_its_teacher(distill, tmp_path):
    """--student-init teacher: round 1's student is 05's network (head included), not 02's;
    round 2's is round 1's student, the round-2 teacher."""
    data, work, _ = distill
    w = upstream_copy(work, tmp_path)
    ck = common.load_checkpoint(w / "05_selftrain" / "model.pt")     # make 05 differ from 02
    ck["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck["model"].items()}
    common.save_checkpoint(w / "05_selftrain" / "model.pt", **ck)
    starts = distill_recording_starts(data, w, "teacher", rounds=2)
    warm = common.load_checkpoint(w / "02_warmup" / "model.pt")["model"]
    round1 = common.load_checkpoint(w / "06_distill" / "round1" / "model.pt")["model"]
    assert len(starts) == 2
    for k, v in ck["model"].items():
        assert torch.equal(starts[0][k], v), k
        assert torch.equal(starts[1][k], round1[k]), k
    floats = [k for k, v in warm.items() if v.is_floating_point()]
    assert all(not torch.equal(starts[0][k], warm[k]) for k in floats)
    m = json.loads((w / "06_distill" / "manifest.json").read_text())["summary"]
    assert m["student_init"] == "teacher"
    assert [r["student_init"]["path"] for r in m["rounds"]] == [
        str(w / "05_selftrain" / "model.pt"), str(w / "06_distill" / "round1" / "model.pt")]


def check_teacher_labels(data, work, scales, threshold):
    """06's round-1 label files are the argmax of the teacher's logits averaged over
    `scales` and the flip, 255 where the confidence is at or below `threshold`; the round
    reports them as 03 does. Returns the share of pixels labelled."""
    m = json.loads((work / "06_distill" / "manifest.json").read_text())["summary"]
    assert m["conf_threshold"] == threshold
    r = m["rounds"][0]
    teacher, _ = common.model_from_checkpoint(work / "05_selftrain" / "model.pt")
    kept = pixels = 0
    for p, _ in common.target_train_items(data):
        prob = ds.teacher_probs(teacher, common.image_tensor(p), scales)
        conf, arg = prob.max(1)
        want = np.where(conf[0].numpy() > threshold, arg[0].numpy(), 255)
        got = np.array(Image.open(work / "06_distill" / "round1" / "labels" / common.item_name(p)))
        assert np.array_equal(got, want)
        kept += int((want != 255).sum())
        pixels += want.size
    # the round reports its labels as 03 does (ratio; accuracy against the toy ground truth)
    assert r["labels"]["pl_ratio"] == pytest.approx(kept / pixels, abs=1e-4)
    assert r["labels"]["images_with_ground_truth"] == 2 and 0 <= r["labels"]["accuracy"] <= 1
    report = json.loads((work / "06_distill" / "round1" / "labels_report.json").read_text())
    assert report["pl_ratio"] == r["labels"]["pl_ratio"] and set(report["labelled_share"]) == set(common.CLASSES)
    return kept / pixels


def test_distill_labels_are_the_official_ones_and_statistics_are_re_estimated(distill):
    """By default (the official inference.py) every pixel gets the argmax of the teacher's
    logits averaged over scales 0.75, 1, 1.5 and the flip; the round's summary reports the
    target mIoU with the statistics of training and after re-estimating them (--bn-images)."""
    data, work, _ = distill
    m = json.loads((work / "06_distill" / "manifest.json").read_text())
    assert m["args"]["scales"] == [0.75, 1.0, 1.5] and m["summary"]["bn_images"] == 2
    assert check_teacher_labels(data, work, (0.75, 1.0, 1.5), 0.0) == 1.0
    r = m["summary"]["rounds"][0]
    assert isinstance(r["running_bn_target_miou"], float) and isinstance(r["target_miou"], float)


def test_distill_labels_with_prodas_threshold(distill, tmp_path):
    """--conf-threshold 0.95 --scales 1 (ProDA's stages 2 and 3): 255 where the
    flip-averaged confidence is at or below 0.95."""
    data, work, _ = distill
    w = upstream_copy(work, tmp_path)
    distill_recording_starts(data, w, "warmup-full", "--conf-threshold", "0.95", "--scales", "1")
    assert check_teacher_labels(data, w, (1.0,), 0.95) < 1.0


@pytest.mark.parametrize("mode, want", [("target", [0.0, 0.1]), ("official", [0.1, 0.1])])
def test_only_the_target_forward_moves_the_students_running_statistics(distill, tmp_path, mode, want):
    """--bn-stats target (default, as 05): the source forward normalises with its own batch
    statistics but leaves the running ones (momentum 0 during it) to the target forward,
    so the saved student's statistics are the target's, not a blend of the two domains;
    'official' lets both forwards update them. One iteration: source, then target."""
    data, work, _ = distill
    w = upstream_copy(work, tmp_path)
    seen, real_loop = [], common.train_loop

    def spy_loop(args, out_dir, model, *a, **kw):
        bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        bn.register_forward_hook(lambda mod, i, o: seen.append(mod.momentum) if mod.training else None)
        return real_loop(args, out_dir, model, *a, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "train_loop", spy_loop)
        run_stage("06_distill", "--data", data, "--work", w, "--student-init", "warmup-full", "--no-stm",
                  "--rounds", "1", "--iters", "1", "--eval-every", "1", "--batch-size", "2",
                  "--crop", "64", "32", "--workers", "0", "--bn-stats", mode)
    assert seen == want

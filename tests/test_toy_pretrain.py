"""toy_pretrain.py: the toy stand-in for ImageNet weights, and the stages that load it."""
import json
import sys

import numpy as np
import pytest
import torch

import common
import demo
import toy_data
import toy_pretrain as tp
from conftest import ROOT, TINY_TRAIN, load_stage, run_stage


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small pre-training run (file and manifest)."""
    out = tmp_path_factory.mktemp("pre") / "toy_imagenet_resnet18.pth"
    tp.main(["--out", str(out), "--scenes", "120", "--val-scenes", "20", "--iters", "120",
             "--batch-size", "32"])
    return out


def test_crops_are_source_content_under_other_cameras_with_imagenet_like_labels(monkeypatch):
    """Only the source's scene generator is used (no target content), every crop is
    labelled with one of the object kinds, and the camera changes the rendered colours."""
    calls = []
    layout, render = toy_data.layout, toy_data.render

    def spy_layout(h, w, rng, synthia=False, real=False):
        calls.append(("layout", synthia, real))
        return layout(h, w, rng, synthia=synthia, real=real)

    def spy_render(lab, parts, rng, target):
        calls.append(("render", target))
        return render(lab, parts, rng, target)
    monkeypatch.setattr(toy_data, "layout", spy_layout)
    monkeypatch.setattr(toy_data, "render", spy_render)
    x, y = tp.crops(12, np.random.default_rng(0))
    assert calls.count(("layout", False, False)) == calls.count(("render", False)) == 12
    assert len(calls) == 24
    assert x.shape == (len(y), tp.SIZE, tp.SIZE, 3) and x.dtype == np.uint8
    assert y.min() >= 0 and y.max() < len(tp.KINDS) and len(set(y.tolist())) >= 5
    # no segmentation-only class among the labels
    assert not {"road", "sidewalk", "terrain", "vegetation", "sky", "wall", "fence", "pole"} & set(tp.KINDS)
    img = np.full((8, 8, 3), 120, np.uint8)
    outs = [tp.camera(img, np.random.default_rng(s)).astype(float).mean((0, 1)) for s in range(6)]
    assert np.ptp(np.stack(outs), 0).max() > 10      # other looks per image


def test_pretraining_learns_and_writes_a_torchvision_backbone(pretrained):
    meta = json.loads(pretrained.with_name(pretrained.name + ".json").read_text())
    s = meta["summary"]
    # above always answering the most frequent kind (facade) by more than 8 points, about 2.7
    # binomial sd of the 264 held-out crops, after these 120 iterations (measured: 65.5%
    # against 42.0%; the README's file: 97.5% against 40.3%)
    assert s["heldout_accuracy"] > s["chance"] + 8, s
    state = torch.load(pretrained, map_location="cpu")
    ref = common.build_resnet("resnet18", "none", output_stride=32).state_dict()
    assert set(state) == {k for k in ref if not k.startswith("fc.")}
    assert all(state[k].shape == ref[k].shape for k in state)
    assert meta["args"]["scenes"] == 120 and meta["kinds"] == list(tp.KINDS)


def test_rerun_keeps_a_finished_file_and_bad_arguments_change_nothing(pretrained, capsys):
    before = pretrained.stat().st_mtime_ns, pretrained.read_bytes()
    tp.main(["--out", str(pretrained), "--scenes", "120", "--val-scenes", "20", "--iters", "120",
             "--batch-size", "32"])
    assert "kept" in capsys.readouterr().out
    for bad in (["--iters", "0"], ["--lr", "-1"], ["--scenes", "0"]):
        with pytest.raises(SystemExit):
            tp.main(["--out", str(pretrained), *bad])
        assert "must be" in capsys.readouterr().err
    assert (pretrained.stat().st_mtime_ns, pretrained.read_bytes()) == before


def test_the_stages_load_it_as_pretrained_weights(pretrained, toy_data, tmp_path):
    """02 (--weights), 04 (--encoder-weights) and 06 (--student-init) start from the file's
    tensors, and the manifests record it."""
    state = torch.load(pretrained, map_location="cpu")
    # 02: the backbone at output stride 16 holds the file's tensors
    net = common.build_resnet("resnet18", str(pretrained), output_stride=16)
    assert torch.equal(net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    w = tmp_path / "w"
    run_stage("01_stylize", "--data", toy_data, "--work", w, "--workers", "0")
    run_stage("02_warmup", "--data", toy_data, "--work", w, *TINY_TRAIN, "--weights", pretrained,
              "--iters", "2", "--eval-every", "2", "--source-eval", "0")
    m2 = json.loads((w / "02_warmup" / "manifest.json").read_text())
    assert m2["args"]["weights"] == str(pretrained)
    # 04: E-hat
    enc = load_stage("04_stm").build_encoder("resnet18", str(pretrained))
    assert torch.equal(enc[4][0].conv1.weight, state["layer1.0.conv1.weight"])     # enc[4]: layer1
    assert torch.equal(enc[7][1].bn2.running_var, state["layer4.1.bn2.running_var"])  # enc[7]: layer4
    # 06: the student's backbone
    model = common.build_model("resnet18", "none")
    info = common.load_backbone_init(model.backbone, "resnet18", str(pretrained))
    assert info["tensors_loaded"] == info["tensors_in_backbone"]
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])


def test_demo_and_bench_pass_the_file_to_02_and_04_only(tmp_path):
    f = str(tmp_path / "p.pth")
    plain, pre = dict(demo.configs(False)), dict(demo.configs(False, f))
    for stage, flag in (("02_warmup", "--weights"), ("04_stm", "--encoder-weights")):
        i = plain[stage].index(flag)
        assert plain[stage][i + 1] == "none" and pre[stage][i + 1] == f
        assert plain[stage][:i + 1] + plain[stage][i + 2:] == pre[stage][:i + 1] + pre[stage][i + 2:]
    assert {k: v for k, v in plain.items() if k not in ("02_warmup", "04_stm")} == \
        {k: v for k, v in pre.items() if k not in ("02_warmup", "04_stm")}
    sys.path.insert(0, str(ROOT / "bench"))
    import adaptation
    try:
        adaptation.PRETRAINED = f
        assert adaptation.flags("02_warmup") == pre["02_warmup"]
        assert adaptation.flags("05_selftrain") == plain["05_selftrain"]
    finally:
        adaptation.PRETRAINED = None


class Stop(Exception):
    pass


def _record(calls, stop_at):
    """A stand-in for the scripts' subprocess runner: records each command and stops the
    run at the first one that names `stop_at` (nothing is trained)."""
    def fake_run(cmd, *_):
        calls.append([str(c) for c in cmd])
        if any(str(c).endswith(stop_at) for c in cmd):
            raise Stop
        return 0.0
    return fake_run


def test_demo_uses_an_existing_file_as_it_is_and_makes_a_missing_one(tmp_path, monkeypatch):
    """demo.py starts from the toy pre-training by default (DATA/pretrained/...), made by
    toy_pretrain.py when missing; --pretrained FILE never retrains a file that is there (it
    may have been made with other arguments on purpose); --random-init makes none and gives
    02 and 04 random weights."""
    calls = []
    monkeypatch.setattr(demo, "run", _record(calls, "02_warmup.py"))
    f = tmp_path / "made_elsewhere.pth"
    f.write_bytes(b"not retrained")
    (tmp_path / "data" / "cityscapes").mkdir(parents=True)
    default = tmp_path / "data" / "pretrained" / "toy_imagenet_resnet18.pth"
    for flags, expect_made, weights in ((["--pretrained", str(f)], None, f),
                                        (["--pretrained", str(tmp_path / "missing.pth")],
                                         tmp_path / "missing.pth", tmp_path / "missing.pth"),
                                        ([], default, default),
                                        (["--pretrained"], default, default),
                                        (["--random-init"], None, "none")):
        calls.clear()
        with pytest.raises(Stop):
            demo.main(["--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"), *flags])
        made = [c for c in calls if any(x.endswith("toy_pretrain.py") for x in c)]
        assert (made[0][made[0].index("--out") + 1] if made else None) == \
            (str(expect_made) if expect_made else None), (flags, calls)
        assert calls[-1][calls[-1].index("--weights") + 1] == str(weights)
    assert f.read_bytes() == b"not retrained"
    with pytest.raises(SystemExit):      # one init or the other
        demo.main(["--data", str(tmp_path / "data"), "--random-init", "--pretrained", str(f)])


def test_bench_makes_one_file_for_every_seed_or_none_with_random_init(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "bench"))
    import adaptation
    calls = []
    monkeypatch.setattr(adaptation, "run", _record(calls, "demo.py"))
    try:
        with pytest.raises(Stop):
            adaptation.main(["--out", str(tmp_path / "b"), "--seeds", "3", "4"])
        pre = str(tmp_path / "b" / "pretrained" / "toy_imagenet_resnet18.pth")
        assert [c[0] for c in calls] == ["toy_pretrain.py", "demo.py"]
        assert calls[0][calls[0].index("--out") + 1] == pre
        assert calls[1][calls[1].index("--pretrained") + 1] == pre
        assert adaptation.flags("04_stm")[adaptation.flags("04_stm").index("--encoder-weights") + 1] == pre
        calls.clear()
        with pytest.raises(Stop):
            adaptation.main(["--out", str(tmp_path / "r"), "--seeds", "3", "--random-init"])
        assert [c[0] for c in calls] == ["demo.py"] and "--random-init" in calls[0]
        assert "--pretrained" not in calls[0]
        assert adaptation.flags("02_warmup")[adaptation.flags("02_warmup").index("--weights") + 1] == "none"
    finally:
        adaptation.PRETRAINED = None


def test_the_two_schedules_by_hand():
    """cosine: lr * it/warm for the first 10% (warm = 10 of 100), then 0.5 (1 + cos(pi t)) to
    0, momentum 0.9 throughout; onecycle: lr/25 at the start, the peak at 10%, lr/25e4 at
    the end, momentum 0.95 at the ends and 0.85 at the peak."""
    def trace(schedule, iters=100):
        opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9, nesterov=True)
        sched = tp.lr_schedule(opt, schedule, iters)
        out = []
        for _ in range(iters):   # the lr and momentum each iteration trains with
            out.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))
            opt.step()
            sched.step()
        return out
    cos = trace("cosine")
    assert cos[0][0] == pytest.approx(0.01) and cos[4][0] == pytest.approx(0.05)
    assert cos[9][0] == pytest.approx(0.1)
    assert cos[54][0] == pytest.approx(0.05)               # halfway through the 90 cosine steps
    assert cos[99][0] == pytest.approx(0.1 * 0.5 * (1 + np.cos(np.pi * 90 / 90)), abs=1e-12)
    assert {m for _, m in cos} == {0.9}
    one = trace("onecycle")
    assert one[0] == (pytest.approx(0.004), pytest.approx(0.95))
    peak = max(range(100), key=lambda i: one[i][0])
    assert peak in (9, 10) and one[peak][0] == pytest.approx(0.1, rel=1e-3)
    assert one[peak][1] == pytest.approx(0.85, abs=1e-3)
    assert one[99][0] == pytest.approx(0.004 / 1e4, rel=1e-6) and one[99][1] == pytest.approx(0.95)
    with pytest.raises(ValueError, match="schedule must be"):
        tp.lr_schedule(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1), "step", 100)
    # short runs too (demo.py --small makes its file in 10 iterations, where a 10% rise of one
    # iteration made torch's OneCycleLR divide by zero)
    for iters in range(1, 31):
        trace("onecycle", iters)

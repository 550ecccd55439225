"""Foundation: label decodings on files in the real formats, class subsets, IoU (by hand
and against the official Cityscapes evaluator), the model, strict loading, transforms."""
import json
import struct
import zlib
from argparse import Namespace

import numpy as np
import pytest
import torch
from PIL import Image

import common


# ============ label decodings, on files written in the real formats ============
def write_png16_rgb(path, rgb16):
    """A minimal independent PNG encoder (16-bit RGB, no filter), so the SYNTHIA test does
    not trust the library that reads the file."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.write_bytes(png)


def test_synthia_16bit_label(tmp_path):
    # R holds the SYNTHIA class id; G a large instance id that an 8-bit reader would mangle
    ids = np.array([[3, 4, 2, 21], [5, 7, 15, 9], [6, 1, 10, 17], [8, 19, 12, 11], [0, 13, 14, 22]],
                   np.uint16)
    rgb = np.stack([ids, np.full_like(ids, 4242), np.full_like(ids, 300)], -1)
    write_png16_rgb(tmp_path / "l.png", rgb)
    raw = common.read_png16(tmp_path / "l.png")
    assert raw.dtype == np.uint16 and (raw[..., 0] == ids).all() and (raw[..., 1] == 4242).all()
    got = common.decode_label(tmp_path / "l.png", "synthia")
    want = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 10, 11, 12], [13, 15, 17, 18],
                     [255, 255, 255, 255]])
    assert (got == want).all()


def test_gta5_palette_label(tmp_path):
    ids = np.array([[7, 8, 11, 12, 13, 17, 19, 20, 21, 22],
                    [23, 24, 25, 26, 27, 28, 31, 32, 33, 0]], np.uint8)
    im = Image.fromarray(ids).convert("P")
    im.putpalette(list(np.random.default_rng(0).integers(0, 255, 768)))  # any palette
    im.save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "P"
    got = common.decode_label(tmp_path / "g.png", "gta5")
    assert got[0].tolist() == list(range(10)) and got[1].tolist() == list(range(10, 19)) + [255]


def test_cityscapes_label_and_trainid_round_trip(tmp_path):
    lab = np.array([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 255]], np.uint8)
    Image.fromarray(common.trainid_to_labelid(lab)).save(tmp_path / "c.png")
    assert (common.decode_label(tmp_path / "c.png", "cityscapes") == lab).all()
    # labelIds that are not train classes (e.g. 1 ego vehicle, 34 license plate) are ignored
    Image.fromarray(np.array([[1, 34, 6, 9]], np.uint8)).save(tmp_path / "d.png")
    assert (common.decode_label(tmp_path / "d.png", "cityscapes") == 255).all()


def test_trainid_label_out_of_range(tmp_path):
    Image.fromarray(np.array([[0, 19]], np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(common.DataError, match="trainIds 0..18 or 255, found \\[19\\]"):
        common.decode_label(tmp_path / "bad.png", "trainid")


def test_corrupt_and_missing_image(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(common.DataError, match="x.png: cannot decode"):
        common.read_image(tmp_path / "x.png")
    with pytest.raises(common.DataError, match="not found"):
        common.read_image(tmp_path / "nope.png")


def test_class_subsets():
    assert len(common.EVAL_CLASSES["19"]) == 19
    s16 = [common.CLASSES[c] for c in common.EVAL_CLASSES["16"]]
    s13 = [common.CLASSES[c] for c in common.EVAL_CLASSES["13"]]
    assert len(s16) == 16 and not {"terrain", "truck", "train"} & set(s16)
    assert len(s13) == 13 and not {"terrain", "truck", "train", "wall", "fence", "pole"} & set(s13)
    # the official SYNTHIA map also has terrain, truck, train (16->9, 18->14, 20->16), which
    # the 16-class evaluation leaves out
    assert set(common.SYNTHIA_ID_TO_TRAIN.values()) == set(range(19))
    assert {common.SYNTHIA_ID_TO_TRAIN[i] for i in (16, 18, 20)} == {9, 14, 16}
    assert not {9, 14, 16} & set(common.EVAL_CLASSES["16"])


def test_readers_skip_bad_pairs(toy_data, capsys):
    common._WARNED.clear()          # warnings print once per process; earlier tests saw them
    items = common.gta5_items(toy_data)
    names = [p.name for p, _ in items]
    err = capsys.readouterr().err
    # the toy GTA5 has, like the real one, a missing label and a size mismatch
    assert "no label at" in err and "but label" in err
    n_imgs = len(list((toy_data / "GTA5" / "images").glob("*.png")))
    assert len(names) == n_imgs - 2
    assert len(common.synthia_items(toy_data)) > 0
    val = common.cityscapes_items(toy_data, "val")
    assert all(l.name.endswith("_gtFine_labelIds.png") for _, l in val)
    with pytest.raises(common.DataError, match="GTA5/images"):
        common.gta5_items(toy_data / "nowhere")


# ============ metrics ============
def test_iou_hand_made_confusion():
    # 3 classes; rows = ground truth, columns = prediction (+ a 'no class' column)
    cm = np.array([[5, 1, 0, 0],
                   [2, 3, 0, 1],
                   [0, 0, 0, 0]])
    iou = common.iou_per_class(cm)
    assert iou[0] == pytest.approx(5 / (5 + 2 + 1))       # TP 5, FP 2, FN 1
    assert iou[1] == pytest.approx(3 / (3 + 1 + 3))       # TP 3, FP 1, FN 3 (incl. 'no class')
    assert np.isnan(iou[2])
    assert common.miou(iou, (0, 1, 2)) == pytest.approx((5 / 8 + 3 / 7) / 2)


def test_confusion_ignores_255_and_counts_unlabelled_predictions():
    label = np.array([0, 0, 1, 255, 1])
    pred = np.array([0, 1, 1, 0, 255])
    cm = common.confusion(pred, label, 3)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 0]]


def test_iou_matches_official_cityscapes_evaluator(tmp_path):
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    rng = np.random.default_rng(0)
    preds, gts, cm = [], [], 0
    for k in range(3):
        gt = rng.integers(0, 20, (24, 40)).astype(np.uint8)
        gt[gt == 19] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 19, gt.shape)).astype(np.uint8)
        pred[pred == 255] = 3
        gp, pp = tmp_path / f"c_000000_00000{k}_gtFine_labelIds.png", tmp_path / f"p{k}.png"
        Image.fromarray(common.trainid_to_labelid(gt)).save(gp)
        Image.fromarray(common.trainid_to_labelid(pred)).save(pp)
        gts.append(str(gp)); preds.append(str(pp))
        cm = cm + common.confusion(pred, common.decode_label(gp, "cityscapes"))
    ev.args.quiet = True
    ev.args.evalInstLevelScore = False
    ev.args.JSONOutput = False
    ev.args.exportFile = str(tmp_path / "res.json")
    res = ev.evaluateImgLists(preds, gts, ev.args)
    from cityscapesscripts.helpers.labels import trainId2label
    ours = common.iou_per_class(cm)
    for t in range(19):
        assert ours[t] == pytest.approx(res["classScores"][trainId2label[t].name], abs=1e-12)
    assert 100 * common.miou(ours, common.EVAL_CLASSES["19"]) == pytest.approx(
        100 * res["averageScoreClasses"], abs=1e-9)


def test_label_tally_hand_counts(tmp_path):
    """03's and 06's pseudo-label report, on two 1x4 images whose counts can be checked by
    hand: ratio over every pixel, accuracy over labelled pixels with ground truth, the
    share of each class's ground-truth pixels labelled correctly, and the classes that
    occur but got no correct label."""
    gt1 = np.array([[0, 0, 13, 13]], np.uint8)       # road road car car
    gt2 = np.array([[0, 11, 11, 255]], np.uint8)     # road person person (void)
    for name, gt in (("a.png", gt1), ("b.png", gt2)):
        Image.fromarray(common.trainid_to_labelid(gt)).save(tmp_path / name)
    t = common.LabelTally()
    assert t.add(np.array([[0, 0, 255, 0]], np.uint8), tmp_path / "a.png").tolist() == gt1.tolist()
    t.add(np.array([[0, 255, 255, 11]], np.uint8), tmp_path / "b.png")
    assert t.add(np.array([[1, 255]], np.uint8), None) is None    # no ground truth: ratio only
    s = t.summary("gta5")
    assert s["pl_ratio"] == pytest.approx(6 / 10)
    # labelled pixels with ground truth: road->road x3, car->road, void->person (not counted)
    assert s["accuracy"] == pytest.approx(3 / 4)
    assert s["images_with_ground_truth"] == 2
    assert s["unlabelled_classes"] == ["person", "car"]           # both occur, neither labelled right
    r = t.report("gta5")
    assert r["labelled_share"]["road"] == pytest.approx(100.0)    # 3 of 3 road pixels
    assert r["labelled_share"]["car"] == 0.0 and r["labelled_share"]["person"] == 0.0
    assert r["labelled_share"]["sky"] is None                      # never in the ground truth
    assert r["pseudo_pixels_per_class"]["road"] == 4 and r["pseudo_pixels_per_class"]["person"] == 1
    # road: TP 3, FP 1 (a car pixel), FN 0 -> 75% IoU
    assert r["iou"]["road"] == pytest.approx(75.0)

def test_label_tally_leaves_out_unusable_ground_truth(tmp_path, capsys):
    """The target ground truth is report-only: a label of the wrong size or a corrupt one is
    named in a warning and left out of the report, and the stage goes on."""
    Image.fromarray(common.trainid_to_labelid(np.zeros((1, 4), np.uint8))).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    t = common.LabelTally()
    assert t.add(np.zeros((1, 2), np.uint8), tmp_path / "a.png") is None
    assert t.add(np.zeros((1, 4), np.uint8), tmp_path / "bad.png") is None
    err = capsys.readouterr().err
    assert "ground truth is 4x1 but the image is 2x1" in err and "bad.png" in err
    assert err.count("left out of the pseudo-label report") == 2
    s = t.summary("gta5")
    assert s == {"pl_ratio": 1.0}                                  # as without ground truth


def test_iou_table_layout():
    cm = np.zeros((19, 20), np.int64)
    cm[np.arange(19), np.arange(19)] = 1
    t = common.iou_table(cm, "synthia", "title")
    lines = t.splitlines()
    assert lines[0] == "title" and "mIoU16" in lines[1] and "mIoU13" in lines[1]
    assert "terr." not in lines[1] and lines[2].split()[-1] == "100.0"


# ============ model and weights ============
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_model_shapes_and_output_stride(backbone):
    m = common.build_model(backbone).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feat, logits = m(x)
        b = m.backbone
        high = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x))))))))
    assert feat.shape == (1, 256, 16, 24) and logits.shape == (1, 19, 16, 24)
    assert high.shape[-2:] == (4, 6)  # output stride 16


def test_strict_weight_loading(tmp_path):
    m = common.build_model("resnet18")
    sd = {k: v for k, v in m.backbone.state_dict().items()}
    sd["fc.weight"] = torch.zeros(1000, 512)
    sd["fc.bias"] = torch.zeros(1000)
    torch.save(sd, tmp_path / "ok.pth")
    net = common.build_resnet("resnet18", str(tmp_path / "ok.pth"))
    assert torch.equal(net.conv1.weight, m.backbone.conv1.weight)
    del sd["layer1.0.conv1.weight"]
    sd["head.extra"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(KeyError) as e:
        common.build_resnet("resnet18", str(tmp_path / "bad.pth"))
    assert "layer1.0.conv1.weight" in str(e.value) and "head.extra" in str(e.value)
    with pytest.raises(FileNotFoundError):
        common.build_resnet("resnet18", str(tmp_path / "missing.pth"))


# ============ transforms ============
def test_joint_transform_keeps_maps_aligned():
    torch.manual_seed(0)
    h, w = 40, 60
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    code = (ys * w + xs)                                  # a unique value per pixel
    img = torch.stack([code % 256, code // 256, torch.zeros_like(code)]).byte()
    lab, stm = (code % 256).byte(), (code // 256).byte()
    for _ in range(10):
        out, (l2, s2) = common.joint_transform(img, [lab, stm], crop=(32, 24), scale=(1.0, 1.0),
                                               flip=True, jitter=0.0)
        assert out.shape == (3, 24, 32) and l2.shape == (24, 32)
        assert torch.equal(out[0], l2) and torch.equal(out[1], s2)


def test_joint_transform_pads_with_ignore():
    img = torch.full((3, 10, 10), 7, dtype=torch.uint8)
    lab = torch.zeros(10, 10, dtype=torch.uint8)
    out, (l2,) = common.joint_transform(img, [lab], crop=(16, 12), scale=(1.0, 1.0), flip=False)
    assert out.shape == (3, 12, 16) and (l2 == 255).sum() == 16 * 12 - 100


def test_poly_lr():
    assert common.poly_lr(1.0, 0, 100) == 1.0
    assert common.poly_lr(1.0, 50, 100, 0.9) == pytest.approx(0.5 ** 0.9)
    assert common.poly_lr(1.0, 0, 100, warmup=10) == pytest.approx(0.1)


def _finished_run(work, name, **args):
    """A stage run through Stage.begin/finish with `args`, holding one file."""
    st = common.Stage(Namespace(work=str(work), **args), name)
    st.begin()
    (st.dir / "model.pt").write_text(f"trained with {args}")
    return st


def test_a_finished_run_is_kept_until_the_run_replacing_it_finishes(tmp_path, capsys):
    old = _finished_run(tmp_path, "02_warmup", lr=0.1)
    old.finish({"miou": 1.0})
    new = common.Stage(Namespace(work=str(tmp_path), lr=0.2), "02_warmup")
    assert new.begin() is False                             # other arguments: a new run
    prev = tmp_path / "02_warmup.previous"
    assert "kept in" in capsys.readouterr().out
    assert sorted(p.name for p in new.dir.iterdir()) == ["run.json"]
    assert (prev / "model.pt").read_text() == "trained with {'lr': 0.1}"
    assert json.loads((prev / "manifest.json").read_text())["complete"]
    # the new run fails after writing a file; a third one (other arguments again) stops
    # rather than delete it, and with --resume never clears it, still keeping the finished run
    (new.dir / "model.pt").write_text("half trained")
    with pytest.raises(common.StageError, match=r"unfinished run with 1 file\(s\) written, e\.g\. "
                                                r".*model\.pt.*--lr 0\.2 \(now 0\.3\).*--resume never"):
        common.Stage(Namespace(work=str(tmp_path), lr=0.3, resume="auto"), "02_warmup").begin()
    assert (new.dir / "model.pt").read_text() == "half trained"
    third = common.Stage(Namespace(work=str(tmp_path), lr=0.3, resume="never"), "02_warmup")
    third.begin()
    assert not (third.dir / "model.pt").exists()             # discarded on purpose
    assert (prev / "model.pt").read_text() == "trained with {'lr': 0.1}"
    (third.dir / "model.pt").write_text("trained with lr 0.3")
    third.finish({"miou": 2.0})
    assert not prev.exists()                                 # removed once the new run finished
    assert common.read_manifest(tmp_path, "02_warmup")["args"]["lr"] == 0.3


def test_rerunning_a_finished_stage_keeps_its_run_id_and_later_stages_valid(tmp_path):
    """Rerunning a finished stage with the same arguments (demo.py after an interruption)
    resumes it under the same run id, so a later stage made from it still resumes instead
    of finding its upstream changed and starting again; other arguments make a new run."""
    first = _finished_run(tmp_path, "02_warmup", lr=0.1)
    first_id = first.finish({"miou": 1.0})["run_id"]
    later = common.Stage(Namespace(work=str(tmp_path), ratio=0.6), "03_maps")
    later.use("02_warmup")
    later.begin()
    (later.dir / "gmm.npz").write_text("fitted")
    later.finish({})
    again = common.Stage(Namespace(work=str(tmp_path), lr=0.1), "02_warmup")
    assert again.begin() is True
    assert again.finish({"miou": 1.0})["run_id"] == first_id
    later = common.Stage(Namespace(work=str(tmp_path), ratio=0.6), "03_maps")
    later.use("02_warmup")
    assert later.begin() is True and (later.dir / "gmm.npz").read_text() == "fitted"
    # a run.json from before run ids were kept there: the finished manifest's id is kept
    run = again.dir / "run.json"
    common.save_json(run, {k: v for k, v in json.loads(run.read_text()).items() if k != "run_id"})
    old_layout = common.Stage(Namespace(work=str(tmp_path), lr=0.1), "02_warmup")
    assert old_layout.begin() is True and old_layout.finish({})["run_id"] == first_id
    other = common.Stage(Namespace(work=str(tmp_path), lr=0.2), "02_warmup")
    assert other.begin() is False and other.finish({})["run_id"] != first_id


def test_resuming_a_finished_run_keeps_its_work_time_first_finish_and_environment(tmp_path):
    """A finished stage rerun with the same arguments (it resumes in seconds) must not
    report the resume as the time of the work: its manifest adds the resume to the
    earlier time and keeps the first finish; a new run starts its own count."""
    first = _finished_run(tmp_path, "02_warmup", lr=0.1)
    first.t0 -= 1000.0                                       # as if training took 1000 s
    m1 = first.finish({"miou": 1.0})
    assert m1["wall_time_s"] >= 1000.0 and m1["first_finished"] == m1["finished"]
    # (trained on another machine: the resume keeps the environment that made the figures)
    common.save_json(first.dir / "manifest.json", {**m1, "environment": {"cpu": "elsewhere"}})
    again = common.Stage(Namespace(work=str(tmp_path), lr=0.1), "02_warmup")
    assert again.begin() is True
    again.t0 -= 5.0                                          # the resume took 5 s
    m2 = again.finish({"miou": 1.0})
    assert m1["wall_time_s"] + 5.0 <= m2["wall_time_s"] < m1["wall_time_s"] + 60.0
    assert m2["first_finished"] == m1["finished"] and m2["environment"] == {"cpu": "elsewhere"}
    other = common.Stage(Namespace(work=str(tmp_path), lr=0.2), "02_warmup")
    assert other.begin() is False
    m3 = other.finish({"miou": 2.0})
    assert m3["wall_time_s"] < 60.0 and m3["first_finished"] == m3["finished"]
    assert m3["environment"] == common.environment()


def test_manifest_records_the_environment_the_figures_depend_on(tmp_path):
    """The same seed trains to other weights on another CPU kind or thread count, so every
    manifest says which ones made it."""
    env = _finished_run(tmp_path, "02_warmup", lr=0.1).finish({})["environment"]
    assert env["torch"] == torch.__version__ and env["numpy"] == np.__version__
    assert env["threads"] == torch.get_num_threads() >= 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    assert env["cuda"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    assert common.environment("cpu")["cuda"] is None       # a CPU run on a GPU machine names no GPU
    assert common.read_manifest(tmp_path, "02_warmup")["environment"] == env


def test_an_unfinished_run_that_wrote_nothing_is_cleared(tmp_path):
    """A run stopped before it wrote anything but run.json (or only a temporary file) holds
    nothing to lose: other arguments simply start afresh."""
    st = common.Stage(Namespace(work=str(tmp_path), ratio=0.6), "03_maps")
    st.begin()
    (st.dir / "labels").mkdir()
    (st.dir / "labels" / ".tmp-1234-a.png").write_text("half")
    assert common.Stage(Namespace(work=str(tmp_path), ratio=0.5), "03_maps").begin() is False
    assert sorted(p.name for p in st.dir.iterdir()) == ["run.json"]


def test_an_unfinished_training_run_is_not_deleted_by_other_arguments(tmp_path):
    """A valid but different flag (a typo) must not delete an interrupted training: the
    stage stops, names what differs and keeps last.pt; the same arguments resume it;
    --resume never discards it on purpose."""
    old = _finished_run(tmp_path, "05_selftrain", iters=90000, lr=5e-4, resume="auto")  # never finished
    (old.dir / "last.pt").write_text("iteration 80000")
    typo = common.Stage(Namespace(work=str(tmp_path), iters=9000, lr=5e-4, resume="auto"), "05_selftrain")
    with pytest.raises(common.StageError, match=r"unfinished run with a training checkpoint .*last\.pt.*"
                                                r"--iters 90000 \(now 9000\).*--resume never"):
        typo.begin()
    assert (old.dir / "last.pt").read_text() == "iteration 80000"
    same = common.Stage(Namespace(work=str(tmp_path), iters=90000, lr=5e-4, resume="never"), "05_selftrain")
    # (--resume is not part of the run's key) auto with the same arguments resumes:
    assert common.Stage(Namespace(work=str(tmp_path), iters=90000, lr=5e-4, resume="auto"),
                        "05_selftrain").begin() is True
    assert (old.dir / "last.pt").exists()
    assert same.begin() is False and not (old.dir / "last.pt").exists()   # discarded on purpose
    # a round's checkpoint in a subfolder (06) counts too
    (old.dir / "round1").mkdir()
    (old.dir / "round1" / "last.pt").write_text("round 1")
    with pytest.raises(common.StageError, match=r"round1/last\.pt"):
        common.Stage(Namespace(work=str(tmp_path), iters=1, lr=5e-4, resume="auto"), "05_selftrain").begin()
    # an upstream stage's new run is named as such
    up = common.Stage(Namespace(work=str(tmp_path), iters=90000, lr=5e-4, resume="auto"), "05_selftrain")
    up.upstream = {"03_maps": {"run_id": "another"}}
    with pytest.raises(common.StageError, match="the runs of 03_maps it was made from"):
        up.begin()
    # without its run.json the run's arguments are unknown: still kept
    (old.dir / "run.json").unlink()
    with pytest.raises(common.StageError, match="its run.json is missing or unreadable"):
        common.Stage(Namespace(work=str(tmp_path), iters=90000, lr=5e-4, resume="auto"), "05_selftrain").begin()


BEGIN_UNDER_TORCHRUN = """
import sys
from argparse import Namespace
sys.path.insert(0, {root!r})
import common
common.setup_distributed("cpu")
try:
    r = common.Stage(Namespace(work={work!r}, iters=int(sys.argv[1]), resume="auto"), "02_warmup").begin()
    print(f"rank {{common.get_rank()}}: resuming {{r}}", flush=True)
except common.StageError as e:
    print(f"rank {{common.get_rank()}}: stopped: {{e}}", flush=True)
common.cleanup_distributed()
"""


def test_every_rank_follows_rank_0s_resume_decision(tmp_path):
    """Under torchrun only rank 0 reads run.json; every rank must resume (or stop) with it,
    or the ranks would train different iteration counts."""
    import subprocess
    import sys
    work = tmp_path / "work"
    first = common.Stage(Namespace(work=str(work), iters=40, resume="auto"), "02_warmup")
    first.begin()                                             # an interrupted run of 40 iterations
    (first.dir / "last.pt").write_text("iteration 8")
    script = tmp_path / "begin.py"
    script.write_text(BEGIN_UNDER_TORCHRUN.format(root=str(common.Path(common.__file__).parent), work=str(work)))

    def torchrun(iters):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", "29529", str(script), str(iters)],
                             capture_output=True, text=True, timeout=300,
                             env={**common.os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        return out.stdout
    out = torchrun(40)
    assert "rank 0: resuming True" in out and "rank 1: resuming True" in out
    out = torchrun(400)                                       # other arguments: both ranks stop
    assert "rank 0: stopped:" in out and "rank 1: stopped:" in out and "--iters 40 (now 400)" in out
    assert (first.dir / "last.pt").read_text() == "iteration 8"


def test_a_linked_stage_folder_is_set_aside_as_a_link(tmp_path):
    shared = tmp_path / "other_work"
    _finished_run(shared, "01_stylize", size=1).finish({})
    work = tmp_path / "work"
    work.mkdir()
    (work / "01_stylize").symlink_to(shared / "01_stylize", target_is_directory=True)
    st = common.Stage(Namespace(work=str(work), size=2), "01_stylize")
    st.begin()
    assert (work / "01_stylize.previous").is_symlink() and not st.dir.is_symlink()
    st.finish({})
    assert not (work / "01_stylize.previous").exists()
    assert (shared / "01_stylize" / "model.pt").read_text() == "trained with {'size': 1}"  # untouched


def test_an_unfinished_run_in_a_linked_folder_is_dropped_as_a_link(tmp_path):
    shared = tmp_path / "other_work"
    _finished_run(shared, "05_selftrain", lam=20)                     # begun, never finished
    work = tmp_path / "work"
    work.mkdir()
    (work / "05_selftrain").symlink_to(shared / "05_selftrain", target_is_directory=True)
    st = common.Stage(Namespace(work=str(work), lam=30), "05_selftrain")
    st.begin()
    assert not st.dir.is_symlink() and sorted(p.name for p in st.dir.iterdir()) == ["run.json"]
    assert (shared / "05_selftrain" / "model.pt").read_text() == "trained with {'lam': 20}"
    assert not (work / "05_selftrain.previous").exists()


def test_a_failed_run_says_where_the_finished_run_is(tmp_path, capsys, monkeypatch):
    _finished_run(tmp_path, "05_selftrain", lam=20).finish({})
    monkeypatch.setattr(common, "_SET_ASIDE", None)

    def main(argv):
        common.Stage(Namespace(work=str(tmp_path), lam=30), "05_selftrain").begin()
        raise common.DataError("a corrupt image")

    with pytest.raises(SystemExit) as e:
        common.run_main(main, [])
    assert e.value.code == 1
    err = capsys.readouterr().err
    d, prev = tmp_path / "05_selftrain", tmp_path / "05_selftrain.previous"
    assert "error: a corrupt image" in err
    assert f"kept in {prev}; to go back to it: rm -rf {d} && mv {prev} {d}" in err


def test_more_torchrun_processes_than_gpus_is_refused_before_anything_runs(monkeypatch):
    """Under torchrun each process takes the GPU of its LOCAL_RANK. On a 1-GPU machine a
    second process (local rank 1) used to die deep inside CUDA ('invalid device ordinal',
    seen on an H200); now the flags check names the fix, and --device cpu runs gloo
    processes on the CPU whatever the machine has. (No GPU here: CUDA's presence is
    simulated; bench/cuda_check.sh runs the real case on a GPU.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for k, v in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(k, v)
    want = ("torchrun started local rank 1 but this machine has 1 CUDA device(s): run one process per GPU "
            "(--nproc_per_node 1), or add --device cpu to run the processes on the CPU (gloo)")
    assert common.check_flags(Namespace(device=None)) == [want]
    assert common.check_flags(Namespace(device="cuda")) == [want]
    assert common.check_flags(Namespace(device="cpu")) == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert common.check_flags(Namespace(device=None)) == []
    assert common.pick_device("cpu") == torch.device("cpu")


def test_image_tensor_is_the_decoded_image_as_one_uint8_batch(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)      # H=2, W=3
    Image.fromarray(rgb).save(tmp_path / "a.png")
    t = common.image_tensor(tmp_path / "a.png")
    assert t.shape == (1, 3, 2, 3) and t.dtype == torch.uint8
    assert t[0, :, 1, 2].tolist() == rgb[1, 2].tolist()               # channel-first, same pixel
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")          # greyscale becomes 3 equal channels
    g = common.image_tensor(tmp_path / "grey.png")
    assert g.shape == (1, 3, 2, 3) and torch.equal(g[0, 0], g[0, 2])
    with pytest.raises(common.DataError, match="image not found"):
        common.image_tensor(tmp_path / "missing.png")


def test_toy_source_factor_adds_labelled_source_images_and_keeps_the_rest(toy_data, tmp_path):
    """toy_data.py --source-factor 2 (the larger source of the closing notes' experiment):
    twice the GTA5 and SYNTHIA images, every added one labelled and of the usual size; the
    target sets and the usual source images byte-identical to the default data (the
    session fixture, made with the same seed, scale and count)."""
    import toy_data as td
    big = tmp_path / "big"
    td.main(["--data", str(big), "--scale", "0.5", "--count", "0.5", "--seed", "0", "--source-factor", "2"])
    for sub, pat in (("GTA5/images", "*.png"), ("GTA5/labels", "*.png"),
                     ("SYNTHIA/RAND_CITYSCAPES/RGB", "*.png"), ("SYNTHIA/RAND_CITYSCAPES/GT/LABELS", "*.png")):
        usual = sorted((toy_data / sub).glob(pat))
        added = sorted(set(p.name for p in (big / sub).glob(pat)) - set(p.name for p in usual))
        assert all((big / sub / p.name).read_bytes() == p.read_bytes() for p in usual), sub
        n_images = len(list((toy_data / sub.replace("labels", "images").replace("GT/LABELS", "RGB")).glob(pat)))
        assert len(added) == n_images, sub                       # as many again, each with its label
    for p in (toy_data / "cityscapes").rglob("*.png"):
        assert (big / p.relative_to(toy_data)).read_bytes() == p.read_bytes()
    usual = Image.open(next((toy_data / "GTA5" / "images").glob("*.png"))).size
    last = sorted((big / "GTA5" / "labels").glob("*.png"))[-1]
    assert Image.open(last).size == Image.open(big / "GTA5" / "images" / last.name).size == usual
    with pytest.raises(SystemExit):
        td.main(["--data", str(tmp_path / "x"), "--source-factor", "0.5"])
    assert not (tmp_path / "x").exists()


def test_demo_refuses_a_source_factor_for_data_it_would_not_regenerate(toy_data, tmp_path, capsys):
    import demo
    with pytest.raises(SystemExit) as e:
        demo.main(["--data", str(toy_data), "--work", str(tmp_path / "w"), "--source-factor", "8"])
    assert e.value.code == 2 and "already holds toy data" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_toy_target_differs_from_the_source_in_content_not_only_in_colour():
    """The toy target is another city (toy_data CONTENT_SHIFT), not the source's scenes
    recoloured: over the same number of scenes it holds less terrain and more cars and
    people, and its sidewalks are grey concrete close to the road's grey, where the source's
    stand apart from the road. A global colour transform (GPA) cannot undo the last: it
    moves both classes alike."""
    import toy_data as td

    def stats(real, n=40):
        rng = np.random.default_rng(3)
        share, gap = np.zeros(19), []
        for _ in range(n):
            lab, parts = td.layout(64, 128, rng, real=real)
            img = td.render(lab, parts, rng, target=real).astype(np.float64)
            share += np.bincount(lab[lab < 19], minlength=19) / lab.size / n
            if (lab == td.SW).any() and (lab == td.R).any():
                rgb = [img[lab == k].mean(0) for k in (td.SW, td.R)]
                gap.append(np.linalg.norm((rgb[0] - rgb[1]) / (rgb[0] + rgb[1] + 1)))  # scale-free
        return share, float(np.median(gap))
    (src, src_gap), (tgt, tgt_gap) = stats(False), stats(True)
    assert tgt[td.TERR] < 0.7 * src[td.TERR]
    assert tgt[td.CAR] > 1.2 * src[td.CAR] and tgt[td.PERS] > src[td.PERS]
    assert tgt_gap < 0.6 * src_gap          # sidewalk and road: alike in the target only (0.20 vs 0.42)

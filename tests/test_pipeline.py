"""The whole toy pipeline (demo.py --small) and its fault handling: stale inputs,
interrupted writes, reproducibility."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, TINY_TRAIN, run_stage


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """demo.py --small end to end: toy data, 01-06, ONNX export, predictions."""
    d = tmp_path_factory.mktemp("pipe")
    out = subprocess.run([sys.executable, str(ROOT / "demo.py"), "--small", "--data", str(d / "data"),
                          "--work", str(d / "work")], cwd=ROOT, capture_output=True, text=True,
                         timeout=2400)  # generous: a loaded 2-core machine is slow
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return d, out.stdout


def test_demo_runs_every_stage_and_prints_the_table(pipeline):
    d, stdout = pipeline
    for stage in ("01_stylize", "02_warmup", "03_maps", "04_stm", "05_selftrain", "06_distill", "export"):
        assert json.loads((d / "work" / stage / "manifest.json").read_text())["complete"], stage
    assert "02 warm-up (GPA baseline)" in stdout and "06 distillation, round 2" in stdout
    # by default 02 and 04 start from the toy pre-training, made first under DATA/pretrained/
    pre = d / "data" / "pretrained" / "toy_imagenet_resnet18.pth"
    assert pre.is_file() and f"init: toy pre-training {pre}" in stdout
    for stage, flag in (("02_warmup", "weights"), ("04_stm", "encoder_weights")):
        assert json.loads((d / "work" / stage / "manifest.json").read_text())["args"][flag] == str(pre)
    s5 = json.loads((d / "work" / "05_selftrain" / "manifest.json").read_text())["summary"]
    # the default keeps training's running statistics (official): no re-estimated second figure
    assert s5["bn_images"] == 0 and s5["running_bn_target_miou"] is None
    assert "05 with training's running BN statistics" not in stdout
    preds = sorted((d / "work" / "export" / "predictions").rglob("*_label.png"))
    assert len(preds) == 3
    m6 = json.loads((d / "work" / "06_distill" / "manifest.json").read_text())
    # each round's teacher is the previous round's student
    assert m6["summary"]["rounds"][0]["teacher"].endswith("05_selftrain/model.pt")
    assert m6["summary"]["rounds"][1]["teacher"].endswith("06_distill/round1/model.pt")
    # the deployed model carries the mIoU that 06 measured for it (its last round)
    import onnx
    meta = {p.key: p.value for p in onnx.load(d / "work" / "export" / "bismap.onnx").metadata_props}
    assert meta["checkpoint_stage"] == "06_distill"
    assert meta["miou"] == f"{m6['summary']['rounds'][1]['target_miou']:.2f}"


def _copy(pipeline, tmp_path):
    d, _ = pipeline
    w = tmp_path / "work"
    shutil.copytree(d / "work", w, ignore=shutil.ignore_patterns("06_distill", "export"))
    return d / "data", w


SELF = ["--iters", "2", "--batch-size", "2", "--crop", "64", "32", "--workers", "0", "--eval-every", "2"]


def test_stale_pseudo_labels_are_refused(pipeline, tmp_path):
    data, w = _copy(pipeline, tmp_path)
    labels = sorted((w / "03_maps" / "labels").glob("*.png"))
    labels[0].unlink()
    with pytest.raises(common.StageError, match=f"no pseudo label.*{labels[0].name}.*run 03_maps.py again"):
        run_stage("05_selftrain", "--data", data, "--work", w, *SELF)
    shutil.copy(labels[1], labels[0])
    shutil.copy(labels[1], labels[0].with_name("elsewhere_000000_000000_leftImg8bit.png"))
    with pytest.raises(common.StageError, match="belong to no target image.*run 03_maps.py again"):
        run_stage("05_selftrain", "--data", data, "--work", w, *SELF)


def test_pseudo_labels_from_another_warmup_run_are_refused(pipeline, tmp_path):
    data, w = _copy(pipeline, tmp_path)
    run_stage("02_warmup", "--data", data, "--work", w, *TINY_TRAIN, "--iters", "2", "--eval-every", "2",
              "--source-eval", "0")
    with pytest.raises(common.StageError, match="03_maps is stale.*02_warmup.py.*run 03_maps.py again"):
        run_stage("05_selftrain", "--data", data, "--work", w, *SELF)


def test_missing_earlier_stage_is_named(pipeline, tmp_path):
    data, w = _copy(pipeline, tmp_path)
    shutil.rmtree(w / "04_stm")
    with pytest.raises(common.StageError, match="04_stm/manifest.json not found.*run 04_stm.py first"):
        run_stage("05_selftrain", "--data", data, "--work", w, *SELF)


def test_interrupted_write_leaves_nothing_under_the_real_name(tmp_path):
    target = tmp_path / "x.png"
    with pytest.raises(RuntimeError):
        with common.atomic_write(target) as tmp:
            tmp.write_bytes(b"\x89PNG half")
            raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_a_stage_discards_leftover_temporary_files(pipeline, tmp_path):
    data, w = _copy(pipeline, tmp_path)
    shutil.rmtree(w / "01_stylize")
    run_stage("01_stylize", "--data", data, "--work", w, "--workers", "0")
    imgs = w / "01_stylize" / "images"
    victim = sorted(imgs.glob("*.png"))[0]
    victim.rename(imgs / f".tmp-deadbeef-{victim.name}")   # a crash mid-write leaves only this
    (w / "01_stylize" / "manifest.json").unlink()
    run_stage("01_stylize", "--data", data, "--work", w, "--workers", "0")
    assert victim.exists() and not list(imgs.glob(".tmp-*"))
    assert common.read_image(victim).shape[2] == 3


def test_warmup_is_reproducible_on_cpu(pipeline, tmp_path):
    data, w = _copy(pipeline, tmp_path)
    states = []
    for k in range(2):
        wk = tmp_path / f"r{k}"
        shutil.copytree(w / "01_stylize", wk / "01_stylize")
        run_stage("02_warmup", "--data", data, "--work", wk, *TINY_TRAIN, "--iters", "4",
                  "--eval-every", "4", "--source-eval", "0", "--seed", "3")
        states.append(torch.load(wk / "02_warmup" / "model.pt", weights_only=False)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_pseudo_label_diagnostic_reports_the_labels_accuracy(pipeline):
    """bench/pseudo_labels.py on the small pipeline's 03: its pseudo-label accuracy and the
    class shares of the pseudo labels equal those counted here from the label files and the
    ground truth; with --student set to the warm-up model itself, the student's class
    shares equal 02's."""
    d, _ = pipeline
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "pseudo_labels.py"), "--data", str(d / "data"),
                          "--work", str(d / "work"), "--device", "cpu",
                          "--student", str(d / "work" / "02_warmup" / "model.pt")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    from PIL import Image
    right = total = 0
    counts = np.zeros(common.NUM_CLASSES, np.int64)
    for img, lab in common.cityscapes_items(d / "data", "train", with_labels=True):
        gt = common.decode_label(lab, "cityscapes")
        pl = np.asarray(Image.open(d / "work" / "03_maps" / "labels" / common.item_name(img)))
        sel = (gt != 255) & (pl != 255)
        right, total = right + int((pl[sel] == gt[sel]).sum()), total + int(sel.sum())
        counts += np.bincount(pl[sel], minlength=common.NUM_CLASSES)
    assert total > 0
    assert f"pseudo labels {100 * right / total:.1f}% accurate" in out.stdout, out.stdout
    lines = out.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "truth" in line and "student" in line)
    rows = {line[:14].strip(): line[14:].replace("%", "").split() for line in lines[head + 1:head + 20]}
    for c, name in enumerate(common.CLASSES):
        truth, p02, ppl, _, _, student = rows[name]
        assert ppl == f"{100 * counts[c] / counts.sum():.2f}", (name, rows[name])
        assert student == p02, (name, rows[name])


def test_edge_mask_marks_pixels_near_another_class():
    sys.path.insert(0, str(ROOT / "bench"))
    from pseudo_labels import edge_mask
    gt = np.zeros((5, 7), np.int64)
    gt[:, 4:] = 3                      # a vertical boundary between columns 3 and 4
    e1 = edge_mask(gt, 1)
    assert e1[:, 3].all() and e1[:, 4].all() and not e1[:, :3].any() and not e1[:, 5:].any()
    e2 = edge_mask(gt, 2)
    assert e2[:, 2:6].all() and not e2[:, :2].any() and not e2[:, 6].any()
    assert not edge_mask(gt, 0).any()


def test_ground_truth_ceiling_copies_03_with_the_target_ground_truth(pipeline, tmp_path):
    """bench/adaptation.py's '05 GT' row trains on a copy of 03 whose labels are the target
    ground truth: every label file equals its decoded gtFine file, 03's own labels are
    untouched, and a second call leaves a finished copy as it is."""
    d, _ = pipeline
    sys.path.insert(0, str(ROOT / "bench"))
    from adaptation import ground_truth_as_labels
    src, dst = d / "work" / "03_maps", tmp_path / "03_maps"
    before = {f.name: f.read_bytes() for f in (src / "labels").iterdir()}
    ground_truth_as_labels(src, dst, d / "data")
    gt = common.target_ground_truth(d / "data")
    names = sorted(f.name for f in (dst / "labels").iterdir())
    assert names == sorted(before) and len(names) > 0
    changed = 0
    for n in names:
        want = common.decode_label(gt[n], "cityscapes")
        got = common.decode_label(dst / "labels" / n, "trainid")
        assert np.array_equal(got, want), n
        changed += not np.array_equal(got, common.decode_label(src / "labels" / n, "trainid"))
    assert changed > 0                                   # the pseudo labels were not the truth
    assert {f.name: f.read_bytes() for f in (src / "labels").iterdir()} == before
    (dst / "labels" / names[0]).write_bytes(b"kept")
    ground_truth_as_labels(src, dst, d / "data")         # finished: not redone
    assert (dst / "labels" / names[0]).read_bytes() == b"kept"


def test_label_rows_keep_03s_pixels_with_the_truth_or_02s_argmax(pipeline, tmp_path):
    """bench/adaptation.py's 'where 05 loses' rows: copies of 03 that keep exactly 03's
    labelled pixels, holding there the target ground truth (GT@03) or the warm-up's own
    prediction (02@03, computed with the batch norm statistics 03 used)."""
    d, _ = pipeline
    sys.path.insert(0, str(ROOT / "bench"))
    from adaptation import ground_truth_as_labels, warmup_argmax_as_labels
    work, src = d / "work", d / "work" / "03_maps"
    before = {f.name: f.read_bytes() for f in (src / "labels").iterdir()}
    ground_truth_as_labels(src, tmp_path / "gt" / "03_maps", d / "data", on_mask=True)
    warmup_argmax_as_labels(src, tmp_path / "arg" / "03_maps", d / "data", work)
    gt = common.target_ground_truth(d / "data")
    model, _ = common.model_from_checkpoint(work / "02_warmup" / "model.pt")
    n = json.loads((src / "manifest.json").read_text())["args"]["bn_images"]
    items = common.target_train_items(d / "data")
    if n:
        common.recompute_bn_statistics(model, common.bn_images(items, n), "cpu")
    images = {common.item_name(i[0]): i[0] for i in items}
    differs = 0
    for name in sorted(before):
        pseudo = common.decode_label(src / "labels" / name, "trainid")
        keep = pseudo != common.IGNORE
        assert 0 < keep.sum() < keep.size, name               # 03 labels some pixels, not all
        truth = common.decode_label(gt[name], "cityscapes")
        got = common.decode_label(tmp_path / "gt" / "03_maps" / "labels" / name, "trainid")
        assert np.array_equal(got[keep], truth[keep]) and (got[~keep] == common.IGNORE).all(), name
        img = common.image_tensor(images[name])
        pred = common.predict_logits(model, img)[0].argmax(0).numpy()
        got = common.decode_label(tmp_path / "arg" / "03_maps" / "labels" / name, "trainid")
        assert np.array_equal(got[keep], pred[keep]) and (got[~keep] == common.IGNORE).all(), name
        differs += not np.array_equal(got, pseudo)
    assert differs > 0                                    # MAPs' assignment is not the argmax
    assert {f.name: f.read_bytes() for f in (src / "labels").iterdir()} == before
    for k, marker in (("gt", "ground_truth_on_mask.txt"), ("arg", "warmup_argmax_on_mask.txt")):
        assert (tmp_path / k / "03_maps" / marker).exists()


def test_bench_table4_distill_and_noise_rows_rerun_only_06_or_05_on_the_same_upstream(pipeline, tmp_path):
    """bench/adaptation.py --rows table4 distill noise on a finished small pipeline: every variant
    runs in its own work folder on the pipeline's own upstream runs (same run ids), with
    only the flags the row names changed, and the report prints what the manifests hold."""
    d, _ = pipeline
    seed_dir = tmp_path / "out" / "seed0"
    seed_dir.mkdir(parents=True)
    (seed_dir / "data").symlink_to(d / "data", target_is_directory=True)   # read only
    shutil.copytree(d / "work", seed_dir / "work")                         # the bench resumes it
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "adaptation.py"), "--small", "--seeds", "0",
                          "--rows", "table4", "distill", "noise", "--out", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    row = json.loads((tmp_path / "out" / "results.json").read_text())[0]

    def m(folder, stage):
        return json.loads((seed_dir / folder / stage / "manifest.json").read_text())

    def changed(a, b):
        """The arguments in which two runs' manifests differ."""
        return {k for k in a["args"] if a["args"][k] != b["args"][k]}
    main5, main6 = m("work", "05_selftrain"), m("work", "06_distill")
    # Table 4 and its control: 05 on the pipeline's 01-04, only the named flags differ
    for name, flags5 in (("no_stm", {"no_stm": True}), ("no_consistency", {"no_consistency": True}),
                         ("no_target", {"alpha": 0.0, "beta": 0.0, "no_consistency": True})):
        r5 = m(f"work_{name}", "05_selftrain")
        # the same upstream runs (without STM, 05 does not read 04)
        assert r5["upstream"] == {k: v for k, v in main5["upstream"].items()
                                  if not (name == "no_stm" and k == "04_stm")}, name
        assert changed(main5, r5) == {"work", *flags5}, (name, changed(main5, r5))
        assert {k: r5["args"][k] for k in flags5} == flags5, name
        assert row[f"05_{name}"] == r5["summary"]["target_miou"], name
    paired = row["05"] - row["05_no_target"]
    assert f"05 - (05 without its target terms: source + STM only, same schedule) paired per seed: " \
           f"{paired:+.1f} +- 0.0" in out.stdout
    # the distillation variants: 05 is the pipeline's, only the named flags differ
    proda, same = m("work_06_proda_labels", "06_distill"), m("work_06_teacher_init", "06_distill")
    assert proda["upstream"]["05_selftrain"] == same["upstream"]["05_selftrain"] == main5["run_id"]
    assert (proda["args"]["conf_threshold"], proda["args"]["scales"]) == (0.95, [1.0])
    assert (same["args"]["student_init"], same["args"]["conf_threshold"]) == ("teacher", 0.0)
    assert changed(main6, proda) == {"work", "conf_threshold", "scales"}, changed(main6, proda)
    assert row["06_proda_labels"] == proda["summary"]["target_miou"]
    assert row["06_teacher_init"] == same["summary"]["target_miou"]
    # the same student without the hard labels: Eq. (11) off, nothing else changed
    nolab = m("work_06_teacher_init_no_labels", "06_distill")
    assert nolab["upstream"]["05_selftrain"] == main5["run_id"]
    assert changed(same, nolab) == {"work", "alpha", "beta"}, changed(same, nolab)
    assert (nolab["args"]["alpha"], nolab["args"]["beta"]) == (0.0, 0.0)
    assert row["06_teacher_init_no_labels"] == nolab["summary"]["target_miou"]
    # the noise rows: 05 and 06 with other stage seeds on the same upstream runs
    assert row["noise_seeds"] == [0, 10, 20]
    assert row["05_noise"][0] == main5["summary"]["target_miou"]
    assert row["06_noise"][0] == main6["summary"]["target_miou"]
    for k, ts in enumerate((10, 20), 1):
        r5, r6 = m(f"work_05_seed{ts}", "05_selftrain"), m(f"work_06_seed{ts}", "06_distill")
        assert r5["args"]["seed"] == r6["args"]["seed"] == ts
        assert r5["upstream"] == main5["upstream"]
        assert r6["upstream"]["05_selftrain"] == main5["run_id"]
        assert (row["05_noise"][k], row["06_noise"][k]) == (r5["summary"]["target_miou"],
                                                            r6["summary"]["target_miou"])
    assert "06 variants on the same 01-05" in out.stdout
    env = main5["environment"]   # where the figures were made (the same machine for every stage here)
    assert f"warm-up run on: {env['cpu']} ({env['cpu_capability']}), {env['threads']} thread(s)" in out.stdout
    assert f"05 {' '.join(f'{x:.1f}' for x in row['05_noise'])}" in out.stdout

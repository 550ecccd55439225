"""Bad input, as a new user meets it (issue 13): a bad flag never costs a finished run,
unknown label ids are errors, unreadable files are found before training, 01 records a
corrupt source as excluded, 05 checks 04 against 03, and expected errors are one line."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import warnings
from argparse import Namespace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT, TINY_TRAIN, run_stage


def linked_copy(src, dst):
    """A copy made of hard links (fast): files a stage deletes or replaces by renaming
    vanish from the copy only. Never write into a linked file in place."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def snapshot(folder):
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def corrupt(path):
    """Replace a file by its first 200 bytes (a truncated download), breaking any hard link."""
    head = Path(path).read_bytes()[:200]
    Path(path).unlink()
    Path(path).write_bytes(head)


# ============ defect 1: a bad flag is refused before the stage touches its folder ============
@pytest.mark.parametrize("stage,bad", [
    ("02_warmup", ["--crop", "0", "0"]), ("02_warmup", ["--batch-size", "0"]),
    ("02_warmup", ["--lr", "-0.01"]), ("02_warmup", ["--eval-every", "0"]),
    ("02_warmup", ["--iters", "0"]), ("02_warmup", ["--batch-size", "1"]),
    ("02_warmup", ["--scale", "1.5", "0.5"]), ("02_warmup", ["--weights", "no/such/file.pth"]),
    ("05_selftrain", ["--iters", "0"]), ("06_distill", ["--iters", "0"]),
])
def test_bad_flag_keeps_the_finished_run(warmup_work, toy_data, tmp_path, capsys, stage, bad):
    work = linked_copy(warmup_work, tmp_path / "w")
    before = {s: snapshot(work / s) for s in ("01_stylize", "02_warmup")}
    good = TINY_TRAIN if stage == "02_warmup" else SELF    # 05/06 take no --weights
    with pytest.raises(SystemExit) as e:
        run_stage(stage, "--data", toy_data, "--work", work, *good, "--iters", "3",
                  "--eval-every", "3", *bad)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad[0]} " in err and "nothing was changed" in err and "Traceback" not in err
    for s, files in before.items():  # model.pt, best.pt, last.pt, log.jsonl, manifest.json ...
        assert snapshot(work / s) == files, s
    assert common.read_manifest(work, "02_warmup")["complete"]


# ============ defect 2: label ids outside the dataset's classes and void ids ============
def test_unknown_label_ids_are_errors(tmp_path):
    ids = np.full((6, 8), 7, np.uint8)
    ids[0, :3] = 250                                          # 3 pixels of an unknown id
    ids[1, :2] = 34                                           # GTA5's license plate: void
    Image.fromarray(ids).convert("P").save(tmp_path / "g.png")
    with pytest.raises(common.DataError, match=r"g\.png.*250 \(3 pixels\)"):
        common.decode_label(tmp_path / "g.png", "gta5")
    ids[0, :3] = 0                                            # void ids decode to ignore
    Image.fromarray(ids).convert("P").save(tmp_path / "g.png")
    assert (common.decode_label(tmp_path / "g.png", "gta5")[1, :2] == 255).all()

    cs = np.array([[7, 0, 1, 99, 99], [26, 255, 33, 29, 16]], np.uint8)   # 99 and 255 unknown
    Image.fromarray(cs).save(tmp_path / "c_gtFine_labelIds.png")
    with pytest.raises(common.DataError, match=r"c_gtFine_labelIds\.png.*99 \(2 pixels\), 255 \(1 pixels\)"):
        common.decode_label(tmp_path / "c_gtFine_labelIds.png", "cityscapes")
    # a trainId file given where labelIds are expected: its 255 (ignore) is not a labelId
    Image.fromarray(np.array([[0, 1, 255]], np.uint8)).save(tmp_path / "t.png")
    with pytest.raises(common.DataError, match="trainIds instead of labelIds"):
        common.decode_label(tmp_path / "t.png", "cityscapes")

    syn = np.array([[3, 22, 13], [40, 40, 0]], np.uint16)    # 22, 13, 0: void; 40: unknown
    bgr = np.stack([np.zeros_like(syn), np.full_like(syn, 500), syn], -1)
    cv2.imwrite(str(tmp_path / "s.png"), bgr)
    with pytest.raises(common.DataError, match=r"s\.png.*40 \(2 pixels\)"):
        common.decode_label(tmp_path / "s.png", "synthia")
    syn[1, :2] = 16          # terrain: trained as trainId 9 (the official map), outside the 16 classes
    cv2.imwrite(str(tmp_path / "s.png"), np.stack([np.zeros_like(syn), np.full_like(syn, 500), syn], -1))
    assert common.decode_label(tmp_path / "s.png", "synthia").tolist() == [[0, 255, 255], [9, 9, 255]]


# ============ defect 3: unreadable files are found before the first iteration ============
def test_unreadable_files_are_listed_before_training(warmup_work, toy_data, tmp_path):
    data = linked_copy(toy_data, tmp_path / "data")
    work = linked_copy(warmup_work, tmp_path / "w")
    val = [p for p, _ in common.target_val_items(data)]
    stylized = sorted((work / "01_stylize" / "images").glob("*.png"))
    corrupt(val[1])
    corrupt(stylized[2])
    before = snapshot(work / "02_warmup")
    with pytest.raises(common.DataError) as e:       # other arguments: a new run would clear the folder
        run_stage("02_warmup", "--data", data, "--work", work, *TINY_TRAIN, "--iters", "4",
                  "--eval-every", "4", "--source-eval", "0")
    msg = str(e.value)
    assert str(val[1]) in msg and str(stylized[2]) in msg and msg.startswith("2 of ")
    assert snapshot(work / "02_warmup") == before    # no training happened, nothing was removed


def test_last_checkpoint_is_written_before_the_evaluation(tmp_path):
    model = torch.nn.Conv2d(1, 1, 1)
    model.backbone_parameters = lambda: [model.weight]
    model.head_parameters = lambda: [model.bias]
    args = Namespace(lr=0.1, head_lr_mult=10, momentum=0.9, weight_decay=0.0, amp=False, iters=6,
                     power=0.9, warmup_iters=0, log_every=100, eval_every=3, save_every=100,
                     batch_size=1, source="gta5", eval_flip=False)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 20)

    def step_loss(it):
        loss = model(torch.ones(1, 1, 1, 1)).pow(2).sum()
        return loss, {"loss": loss.item()}
    with pytest.raises(common.DataError, match="bad.png"):
        common.train_loop(args, tmp_path, model, step_loss, [(tmp_path / "bad.png", tmp_path / "l.png")])
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["iteration"] == 3 and ck["eval_pending"] is True   # the training is kept


class _TinySegmentor(torch.nn.Module):
    """conv -> batch norm -> 19 logits, the (features, logits) pair the stages' models return."""
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 19, 1)

    def forward(self, x):
        f = self.bn(self.conv(x))
        return f, self.head(f)

    def backbone_parameters(self):
        return [*self.conv.parameters(), *self.bn.parameters()]

    def head_parameters(self):
        return list(self.head.parameters())


def test_rerunning_a_finished_run_takes_its_logged_evaluation(tmp_path):
    """last.pt is written before each evaluation (eval_pending). Resuming a run whose last
    evaluation finished (its line is in log.jsonl) must not evaluate or log it again, and
    returns the same figures and the same final state (batch norm re-estimated as before);
    a run killed during that evaluation does it on resume, once."""
    rng = np.random.default_rng(0)
    items = []
    for k in range(3):
        img, lab = tmp_path / f"i{k}.png", tmp_path / f"l{k}.png"
        Image.fromarray(rng.integers(0, 256, (8, 16, 3), dtype=np.uint8)).save(img)
        Image.fromarray(rng.choice(np.array([7, 8, 11], np.uint8), (8, 16))).save(lab)  # road, sidewalk, building
        items.append((img, lab))
    args = Namespace(lr=0.1, head_lr_mult=1, momentum=0.9, weight_decay=0.0, amp=False, iters=4,
                     power=0.9, warmup_iters=0, log_every=100, eval_every=2, save_every=100,
                     batch_size=2, source="gta5", eval_flip=False)
    x = torch.rand(2, 3, 8, 16)

    def run(resume):
        torch.manual_seed(0)
        model = _TinySegmentor()

        def step_loss(it):
            loss = model(x)[1].logsumexp(1).mean()
            return loss, {"loss": loss.item()}
        return common.train_loop(args, tmp_path, model, step_loss, items, resume=resume, bn_items=items)

    def val_lines():
        return [r for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "val" in r]
    metrics, best, state = run(resume=False)
    assert [r["iter"] for r in val_lines()] == [2, 4] and "running_bn_miou" in metrics
    again, best2, state2 = run(resume=True)
    assert [r["iter"] for r in val_lines()] == [2, 4]                    # not evaluated again
    assert again == metrics and best2 == best
    for k, v in state["model"].items():                                  # BN re-estimated as before
        assert torch.equal(v, state2["model"][k]), k
    ran_before = state["model"]["bn.running_mean"].clone()
    assert not torch.equal(ran_before, torch.load(tmp_path / "last.pt", weights_only=False)["model"]["bn.running_mean"])
    # killed during the last evaluation: its line is missing, so the resume evaluates, once
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    (tmp_path / "log.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    again, _, state3 = run(resume=True)
    assert [r["iter"] for r in val_lines()] == [2, 4] and again == metrics
    assert torch.equal(state3["model"]["bn.running_mean"], ran_before)


# ============ defect 4: 01 records a corrupt source, replaces a corrupt reference ============
def test_stylize_excludes_corrupt_source_and_replaces_corrupt_reference(warmup_work, toy_data,
                                                                        tmp_path, capsys):
    data = linked_copy(toy_data, tmp_path / "data")
    work = tmp_path / "w"
    drawn = json.loads((warmup_work / "01_stylize" / "manifest.json").read_text())["references"]
    names = sorted(drawn)
    bad_src = data / "GTA5" / "images" / names[0]
    # a good source image whose drawn reference is broken (not also the broken source's)
    victim = next(n for n in names[1:] if drawn[n] != drawn[names[0]])
    bad_ref = data / Path(drawn[victim]).relative_to(toy_data)
    corrupt(bad_src)
    corrupt(bad_ref)
    run_stage("01_stylize", "--data", data, "--work", work, "--workers", "0")
    m = common.read_manifest(work, "01_stylize")
    assert list(m["excluded"]) == [names[0]] and str(bad_src) in m["excluded"][names[0]]
    assert (work / "01_stylize" / "images" / victim).exists()            # not dropped
    assert m["references"][victim] != str(bad_ref)
    assert any(str(bad_ref) in r for r in m["summary"]["unreadable_references"])
    # later stages skip the excluded image, with one warning that names the corrupt input
    common._WARNED.clear()
    capsys.readouterr()
    args = Namespace(data=data, work=work, source="gta5")
    items, image_for = common.stylized_source(args)
    items2, _ = common.stylized_source(args)
    assert names[0] not in {p.name for p, _ in items} and len(items) == len(items2) == len(common.source_items(data, "gta5")) - 1
    assert all(image_for(p).exists() for p, _ in items)
    err = capsys.readouterr().err
    assert err.count("excluded by 01_stylize") == 1 and str(bad_src) in err


# ============ defect 5: 05 checks that 04 was made from the 03 run it uses ============
STM_ARGS = ["--encoder", "resnet18", "--encoder-weights", "none", "--encoder-scale", "2",
            "--clusters", "4", "--samples", "200", "--workers", "0", "--previews", "0"]
SELF = ["--iters", "2", "--batch-size", "2", "--crop", "64", "32", "--workers", "0", "--eval-every", "2"]


def hand_made_03(work, data, run_id):
    """A finished 03 made from the warm-up in `work`: every target pixel labelled road."""
    for p, _ in common.target_train_items(data):
        w, h = common.image_size(p)
        common.save_png(work / "03_maps" / "labels" / common.item_name(p), np.zeros((h, w), np.uint8))
    warm = common.read_manifest(work, "02_warmup")
    common.save_json(work / "03_maps" / "manifest.json", {
        "stage": "03_maps", "complete": True, "run_id": run_id, "args": {"source": "gta5", "pla": "maps"},
        "upstream": {"02_warmup": warm["run_id"]}})


def test_selftrain_checks_stm_against_pseudo_labels(warmup_work, toy_data, tmp_path):
    work = linked_copy(warmup_work, tmp_path / "w")
    # 04 run before 03: it says so loudly at the start, and 05 refuses its maps
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        run_stage("04_stm", "--data", toy_data, "--work", work, *STM_ARGS)
    assert any("FALLS BACK" in str(w.message) for w in rec)
    hand_made_03(work, toy_data, "run-A")
    with pytest.raises(common.StageError, match="04_stm grouped Eq. \\(8\\) by the warm-up argmax.*04_stm.py"):
        run_stage("05_selftrain", "--data", toy_data, "--work", work, *SELF)
    # 04 made from 03 run A; then 03 is run again (run B): 04 is stale
    run_stage("04_stm", "--data", toy_data, "--work", work, *STM_ARGS)
    assert common.read_manifest(work, "04_stm")["upstream"]["03_maps"] == "run-A"
    hand_made_03(work, toy_data, "run-B")
    with pytest.raises(common.StageError, match="04_stm is stale.*03_maps.py.*run 04_stm.py again"):
        run_stage("05_selftrain", "--data", toy_data, "--work", work, *SELF)


# ============ defect 6: expected errors are one line and a non-zero exit status ============
def _run(*cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def test_stage_error_is_one_line_without_traceback(tmp_path):
    out = _run(ROOT / "02_warmup.py", "--data", tmp_path / "nowhere", "--work", tmp_path / "w",
               "--device", "cpu")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "nowhere" in lines[0] and lines[1].startswith("hint: ")
    assert len(lines) == 2
    debug = _run(ROOT / "02_warmup.py", "--data", tmp_path / "nowhere", "--work", tmp_path / "w",
                 "--device", "cpu", "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr


@pytest.fixture(scope="module")
def onnx_model(toy_data, tmp_path_factory):
    from test_export import fake_stage
    import export_onnx as ex
    work = tmp_path_factory.mktemp("work")
    torch.manual_seed(0)
    fake_stage(work, "02_warmup", model=common.build_model("resnet18"))
    assert ex.main(["export", "--data", str(toy_data), "--work", str(work), "--val-images", "1",
                    "--val-sizes", "native", "--device", "cpu"]) == 0
    return work / "export" / "bismap.onnx"


def _limit_file_size():  # a full disk, as a process sees it: writes past 2 kB fail (EFBIG)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))


def test_predict_write_failures_are_one_line(onnx_model, tmp_path):
    photo = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(photo)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {"--out is a file": ([a_file], {}), "--out under /proc": ([Path("/proc/bismap_out")], {}),
             "full disk": ([tmp_path / "preds"], {"preexec_fn": _limit_file_size})}
    for what, (out, kw) in cases.items():
        r = _run(ROOT / "export_onnx.py", "predict", "--model", onnx_model, photo, "--out", out[0], **kw)
        assert r.returncode != 0, what
        assert "Traceback" not in r.stderr and ".tmp-" not in r.stderr, (what, r.stderr)
        errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
        assert len(errors) == 1 and f"cannot write {out[0]}" in errors[0], (what, r.stderr)
    assert not list((tmp_path / "preds").glob(".tmp-*"))                # nothing half-written


def test_checkpoint_write_failure_names_the_checkpoint_and_keeps_the_old_one(tmp_path):
    # torch's zip writer reports a failed write as a RuntimeError ("unexpected pos ..."), not as
    # an OSError: save_checkpoint must still say which file and why, and leave the old one whole
    ckpt = tmp_path / "last.pt"
    common.save_checkpoint(ckpt, step=1, w=torch.zeros(4))
    code = ("import sys, torch; sys.path.insert(0, sys.argv[1]); import common; "
            "common.save_checkpoint(sys.argv[2], step=2, w=torch.zeros(100_000))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(ckpt)], capture_output=True,
                       text=True, preexec_fn=_limit_file_size)
    assert r.returncode != 0
    assert f"WriteError: cannot write {ckpt}: torch.save failed" in r.stderr, r.stderr
    assert "file-size limit" in r.stderr or "disk is full" in r.stderr, r.stderr
    assert common.load_checkpoint(ckpt)["step"] == 1                      # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]       # no temporary left


def test_a_writer_failing_on_a_full_disk_is_a_write_error(tmp_path, monkeypatch):
    # torch.onnx.export and others raise RuntimeError when the disk fills: with under 256 MiB
    # free that is a WriteError naming the file; with space left it stays the writer's error
    target = tmp_path / "bismap.onnx"
    for free, expected in ((2 ** 20, common.WriteError), (2 ** 40, RuntimeError)):
        monkeypatch.setattr(common.shutil, "disk_usage", lambda p, f=free: shutil._ntuple_diskusage(0, 0, f))
        with pytest.raises(expected) as e:
            with common.atomic_write(target) as tmp:
                tmp.write_bytes(b"half")
                raise RuntimeError("writer failed")
        assert type(e.value) is expected and not list(tmp_path.iterdir())
        if expected is common.WriteError:
            assert str(e.value).startswith(f"cannot write {target}: RuntimeError: writer failed; 1 MiB free")
            assert "the disk is full" in str(e.value)
    assert str(e.value) == "writer failed"

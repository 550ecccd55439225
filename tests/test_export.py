"""export_onnx.py: export of a small random model, onnxruntime vs torch on odd sizes and
batch 2, the uint8 NHWC input contract, the metadata, and `predict` on a folder of
mixed and broken files (no torch imported on that path)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import export_onnx as ex  # noqa: E402

MIOU = 12.34


def fake_stage(work, stage, complete=True, model=None):
    """A stage folder holding model.pt (a real checkpoint when model is given) + manifest."""
    d = Path(work) / stage
    d.mkdir(parents=True, exist_ok=True)
    if model is not None:
        common.save_checkpoint(d / "model.pt", model=model.state_dict(),
                               args={"backbone": "resnet18", "source": "gta5"}, iteration=0)
    else:
        (d / "model.pt").write_bytes(b"not loaded")
    common.save_json(d / "manifest.json", {"stage": stage, "complete": complete, "run_id": stage,
                                           "summary": {"target_miou": MIOU}})  # as 02/05/06 write it
    return d / "model.pt"


@pytest.fixture(scope="module")
def exported(toy_data, tmp_path_factory):
    """work/02_warmup holds a random resnet18; `export` writes work/export/bismap.onnx."""
    work = tmp_path_factory.mktemp("work")
    torch.manual_seed(0)
    fake_stage(work, "02_warmup", model=common.build_model("resnet18"))
    rc = ex.main(["export", "--data", str(toy_data), "--work", str(work), "--val-images", "1",
                  "--val-sizes", "native", "141x77", "--device", "cpu"])
    assert rc == 0
    return work, work / "export" / "bismap.onnx"


@pytest.fixture(scope="module")
def session(exported):
    sess, meta, _ = ex.load_model(exported[1], provider="cpu")
    return sess, meta


# ============ small pure functions, hand-checked ============
def test_window_starts():
    assert ex.window_starts(10, 4, 3) == [0, 3, 6]          # 6 + 4 = 10 ends exactly
    assert ex.window_starts(11, 4, 3) == [0, 3, 6, 7]       # last window shifted back to 11 - 4
    assert ex.window_starts(4, 4, 3) == [0]
    assert ex.window_starts(3, 4, 3) == [0]                 # image smaller than the window


def test_compare_outputs_hand_numbers():
    # (B=1, C=3, H=1, W=2): pixel A is confident (margin 0.2), pixel B a near tie (margin 0.0005)
    ref = np.array([[0.5, 0.3, 0.2], [0.4, 0.3995, 0.2005]], np.float32).T.reshape(1, 3, 1, 2)
    got = np.array([[0.5, 0.3, 0.2], [0.3995, 0.4, 0.2005]], np.float32).T.reshape(1, 3, 1, 2)
    r = ex.compare_outputs(ref, got, np.array([[[0, 1]]]), tol=1e-3)
    assert r["max_prob_diff"] == pytest.approx(0.0005, abs=1e-7)
    assert r["label_agreement"] == 0.5 and r["label_diff_pixels"] == 1
    assert r["unexplained_label_diffs"] == 0                # 0.0005 <= 2 * tol: a tie may flip
    r = ex.compare_outputs(ref, got, np.array([[[1, 1]]]), tol=1e-3)
    assert r["unexplained_label_diffs"] == 1                # A flipped with margin 0.2 > 2 * tol


def test_pick_checkpoint_order(tmp_path):
    with pytest.raises(common.StageError, match="run 02_warmup.py"):
        ex.pick_checkpoint(tmp_path)
    fake_stage(tmp_path, "06_distill", complete=False)        # crashed run: never used
    ck02 = fake_stage(tmp_path, "02_warmup")
    assert ex.pick_checkpoint(tmp_path) == ("02_warmup", ck02)
    ck05 = fake_stage(tmp_path, "05_selftrain")
    assert ex.pick_checkpoint(tmp_path) == ("05_selftrain", ck05)
    ck06 = fake_stage(tmp_path, "06_distill")
    assert ex.pick_checkpoint(tmp_path) == ("06_distill", ck06)


# ============ the exported file ============
def test_graph_contract_and_metadata(exported):
    import onnx
    work, path = exported
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["bismap_format"] == ex.FORMAT
    assert json.loads(meta["classes"]) == list(common.CLASSES)
    assert np.array_equal(np.array(json.loads(meta["palette"])), common.PALETTE)
    assert meta["miou"] == f"{MIOU:.2f}" and meta["backbone"] == "resnet18"
    assert meta["source_checkpoint"] == str(work / "02_warmup" / "model.pt")
    assert meta["checkpoint_stage"] == "02_warmup" and len(meta["checkpoint_sha256"]) == 64

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    (inp,), outs = m.graph.input, {o.name: o for o in m.graph.output}
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims(inp) == ["batch", "height", "width", 3]     # NHWC, dynamic B, H, W
    assert outs["label"].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims(outs["label"]) == ["batch", "height", "width"]
    assert outs["probs"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(outs["probs"]) == ["batch", 19, "height", "width"]
    ops = {n.op_type for n in m.graph.node}
    assert "BatchNormalization" not in ops                  # folded into the convolutions

    man = json.loads((work / "export" / "manifest.json").read_text())
    assert man["complete"] and man["summary"]["miou"] == MIOU
    assert man["summary"]["max_prob_diff"] < 1e-5
    sizes = {(r["size"], r["batch"]) for r in man["validation"]}
    assert ("141x77", 1) in sizes and ("141x77", 2) in sizes


def test_rerun_keeps_an_up_to_date_export(toy_data, tmp_path, capsys):
    """A rerun with the same arguments and checkpoint keeps the file and its manifest; a
    changed checkpoint, or --resume never, exports again."""
    torch.manual_seed(0)
    fake_stage(tmp_path, "02_warmup", model=common.build_model("resnet18"))
    cmd = ["export", "--data", str(toy_data), "--work", str(tmp_path), "--val-images", "1",
           "--val-sizes", "native", "--device", "cpu"]
    man = tmp_path / "export" / "manifest.json"
    onnx_file = tmp_path / "export" / "bismap.onnx"
    assert ex.main(cmd) == 0
    first, first_onnx = man.read_text(), onnx_file.read_bytes()
    capsys.readouterr()
    assert ex.main(cmd) == 0
    assert "is up to date" in capsys.readouterr().out
    assert man.read_text() == first and onnx_file.read_bytes() == first_onnx
    assert ex.main(cmd + ["--resume", "never"]) == 0          # on purpose: exported again
    out = capsys.readouterr().out
    assert "is up to date" not in out and "wrote" in out      # (the file records its export time)
    sha = json.loads(man.read_text())["metadata"]["checkpoint_sha256"]
    torch.manual_seed(1)                                       # other weights, same path and run id
    fake_stage(tmp_path, "02_warmup", model=common.build_model("resnet18"))
    assert ex.main(cmd) == 0
    assert "is up to date" not in capsys.readouterr().out
    assert json.loads(man.read_text())["metadata"]["checkpoint_sha256"] != sha


def test_onnx_matches_torch_odd_sizes_batch2(exported, session, toy_data):
    """Independent of the export's own check: common.predict_logits (the evaluation path)
    vs onnxruntime on sizes that are not multiples of 16, batch 1 and 2."""
    sess, _ = session
    model, _ = common.model_from_checkpoint(exported[0] / "02_warmup" / "model.pt")
    paths = [p for p, _ in common.target_val_items(toy_data)][:2]
    imgs = [np.array(Image.fromarray(common.read_image(p)).resize((123, 45), Image.BILINEAR))
            for p in paths]
    for x in (imgs[0][None], np.stack(imgs), imgs[1][None, :37, :51].copy()):   # (B, H, W, 3) uint8
        label, probs = sess.run(None, {"image": x})
        with torch.no_grad():
            ref = common.predict_logits(model, torch.from_numpy(x).permute(0, 3, 1, 2)).softmax(1).numpy()
        assert label.dtype == np.uint8 and label.shape == x.shape[:3]
        assert probs.dtype == np.float32 and probs.shape == ref.shape
        r = ex.compare_outputs(ref, probs, label, ex.DEFAULT_TOL)
        assert r["max_prob_diff"] < 1e-5 and r["unexplained_label_diffs"] == 0
        assert np.allclose(probs.sum(1), 1, atol=1e-5)


def test_uint8_nhwc_contract(session):
    sess, _ = session
    x = np.full((1, 40, 56, 3), 128, np.uint8)
    sess.run(None, {"image": x})
    with pytest.raises(Exception, match="(?i)type"):
        sess.run(None, {"image": x.astype(np.float32) / 255})   # pre-normalised floats are refused
    with pytest.raises(Exception, match="(?i)dimension"):
        sess.run(None, {"image": np.zeros((1, 3, 40, 56), np.uint8)})  # NCHW is refused


def test_validation_catches_a_mismatch(exported, toy_data):
    """A reference whose class-0 logit is raised by 1 (p0 ~ 1/19 -> ~e/(e+18)) must fail."""
    model, _ = common.model_from_checkpoint(exported[0] / "02_warmup" / "model.pt")
    with torch.no_grad():
        model.classifier.bias[0] += 1.0
    img = common.read_image(common.target_val_items(toy_data)[0][0])
    with pytest.raises(ex.ExportError, match="beyond float32 noise"):
        ex.validate(exported[1], model, [img], [None])


# ============ predict ============
@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)).save(d / "street.jpg")
    Image.fromarray(rng.integers(0, 256, (51, 77), dtype=np.uint8)).save(d / "grey.png")
    Image.fromarray(rng.integers(0, 256, (40, 90, 4), dtype=np.uint8)).save(d / "sub" / "rgba.png")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.txt").write_text("not an image")
    return d


def test_predict_folder(exported, session, photos, tmp_path, capsys):
    out = tmp_path / "pred"
    rc = ex.main(["predict", "--model", str(exported[1]), str(photos), "--out", str(out)])
    assert rc == 1                                           # two files failed
    err = capsys.readouterr()
    bad = [ln for ln in err.err.splitlines() if ln.startswith("error:")]
    assert len(bad) == 2
    assert any("corrupt.png" in ln for ln in bad) and any("empty.jpg" in ln and "0 bytes" in ln for ln in bad)
    assert "3 image(s) labelled" in err.out and "images/s" in err.out and "2 failed" in err.out
    sess, _ = session
    for stem, shape in (("street", (70, 100)), ("grey", (51, 77)), ("sub/rgba", (40, 90))):
        label = np.asarray(Image.open(out / f"{stem}_label.png"))
        color = np.asarray(Image.open(out / f"{stem}_color.png"))
        over = np.asarray(Image.open(out / f"{stem}_overlay.png"))
        assert label.shape == shape and label.dtype == np.uint8 and label.max() < common.NUM_CLASSES
        assert np.array_equal(color, common.PALETTE[label]) and over.shape == shape + (3,)
    # the label PNG is exactly the graph's output on the decoded photo (JPEG decoded by PIL)
    rgb = np.asarray(Image.open(photos / "street.jpg").convert("RGB"))
    ref = sess.run(["label"], {"image": rgb[None]})[0][0]
    assert np.array_equal(np.asarray(Image.open(out / "street_label.png")), ref)


def test_predict_imports_no_torch(exported, photos, tmp_path):
    code = ("import sys; import export_onnx as ex; "
            f"rc = ex.main(['predict', '--model', {str(exported[1])!r}, {str(photos / 'grey.png')!r}, "
            f"'--out', {str(tmp_path / 'p')!r}]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p" / "grey_label.png").exists()
    assert len([ln for ln in r.stderr.splitlines() if "CUDA" in ln or "cuda" in ln]) <= 1  # one note at most


def test_predict_rejects_foreign_models(tmp_path, photos, capsys):
    import onnx
    from onnx import TensorProto, helper
    text = tmp_path / "model.onnx"
    text.write_text("hello")
    assert ex.main(["predict", "--model", str(text), str(photos), "--out", str(tmp_path / "o")]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
    g = helper.make_graph([helper.make_node("Identity", ["image"], ["label"])], "g",
                          [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 4, 4, 3])],
                          [helper.make_tensor_value_info("label", TensorProto.UINT8, [1, 4, 4, 3])])
    foreign = tmp_path / "foreign.onnx"
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # loadable by onnxruntime: the file is valid ONNX, just not ours
    onnx.save(m, str(foreign))
    assert ex.main(["predict", "--model", str(foreign), str(photos), "--out", str(tmp_path / "o")]) == 2
    assert "not a BiSMAP export" in capsys.readouterr().err
    assert ex.main(["predict", "--model", str(tmp_path / "nope.onnx"), str(photos)]) == 2
    assert "not found" in capsys.readouterr().err


def test_max_side_and_window(session):
    sess, _ = session
    rgb = np.random.default_rng(1).integers(0, 256, (70, 100, 3), dtype=np.uint8)
    plain = ex.run_image(sess, rgb)
    assert ex.run_image(sess, rgb, max_side=50).shape == (70, 100)   # labels mapped back
    assert np.array_equal(ex.run_image(sess, rgb, window=128), plain)  # one window = plain run
    tiled = ex.run_image(sess, rgb, window=48)   # 2 x 3 windows of 48 with overlap
    assert tiled.shape == (70, 100) and tiled.max() < common.NUM_CLASSES


def test_provider_choice(exported):
    sess, note = ex.open_session(exported[1], "auto")
    reason = ex._cuda_driver_missing()
    if reason is not None:  # e.g. onnxruntime-gpu on a machine without a driver (this one)
        assert sess.get_providers() == ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers():
            assert note and "\n" not in note and "CPU" in note
        with pytest.raises(ex.ModelError, match="--provider cuda"):
            ex.open_session(exported[1], "cuda")
    elif sess.get_providers()[0] != "CUDAExecutionProvider":  # driver but no usable CUDA libraries
        assert note and "\n" not in note

"""Deployment: the adapted segmentor leaves PyTorch as one ONNX file, and onnxruntime
labels new street images with it.

Paper: the final target-domain segmentor of Sec. 3 (G = F o E, Eq. (1)) after the
self-training of Sec. 3.3 and the self-distillation of Sec. 4.3. No equation of the
paper is implemented here; this is the step that makes the adapted model usable.

export (default subcommand)
  reads   work/06_distill/model.pt, else work/05_selftrain/model.pt, else
          work/02_warmup/model.pt: the latest pipeline stage whose manifest.json is
          complete (or --checkpoint PATH), and its manifest (target val mIoU);
          a few Cityscapes val images (--data) or --images, to validate the file
  writes  work/export/bismap.onnx, work/export/manifest.json
predict
  reads   an exported .onnx and images (files or folders; JPEG, PNG, greyscale, RGBA ...)
  writes  per image, in --out: <name>_label.png (8-bit trainIds 0..18),
          <name>_color.png (Cityscapes palette), <name>_overlay.png (mask over the photo)
  imports onnxruntime, numpy, pillow and tqdm only (no torch): it runs on a machine
  that has none of the training stack.

The graph contract (also stored in the file's metadata):
  input   "image"  uint8 (B, H, W, 3), RGB, 0..255: NHWC, the layout image decoders
          produce (PIL, imageio; OpenCV after [..., ::-1]). Any B, H, W. The graph
          scales to [0, 1] and applies the ImageNet normalisation itself
          (common.normalize), so callers never re-implement the preprocessing.
  outputs "label"  uint8 (B, H, W): argmax trainIds 0..18 at the input size
          "probs"  float32 (B, 19, H, W): softmax of the logits bilinearly resized to
          the input size (align_corners=False, as common.predict_logits)

Commands (real data, then the toy data of toy_data.py):
  python export_onnx.py export --data data --work work
  python export_onnx.py predict --model work/export/bismap.onnx photos/ --out predictions/
  python toy_data.py --data /tmp/toy && python 02_warmup.py --data /tmp/toy --work /tmp/toy_work ...
  python export_onnx.py export --data /tmp/toy --work /tmp/toy_work
  python export_onnx.py predict --model /tmp/toy_work/export/bismap.onnx \\
      /tmp/toy/cityscapes/leftImg8bit/val --out /tmp/toy_work/export/predictions
Very large photos: --max-side 2048 (resize the long side, labels mapped back with
nearest neighbour) or --window 1024 (sliding window at full resolution).
"""
import argparse
import contextlib
import ctypes
import io
import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

FORMAT = "bismap-segmentation-v1"  # metadata key "bismap_format": marks our exports
ONNX_NAME = "bismap.onnx"
PRODUCERS = ("06_distill", "05_selftrain", "02_warmup")  # the latest pipeline stage first
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DEFAULT_TOL = 1e-3


class ModelError(RuntimeError):
    """The model file is missing, not ONNX, or not a BiSMAP export."""


class ImageError(RuntimeError):
    """One input image cannot be used (the message names the problem)."""


class ExportError(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class WriteError(OSError):
    """An output cannot be written (unwritable or full disk, a file where a folder should
    be); the message names the real path, never the temporary one."""


def _write_error(path, e):
    reason = e.strerror or str(e)
    hint = ("the disk is full: free some space" if e.errno in (27, 28, 122)
            else "give --out a writable folder")
    err = WriteError(f"cannot write {path}: {reason} ({hint})")
    err.errno = e.errno
    return err


# ============================================================================
# onnxruntime: providers and sessions (no torch on this path)
# ============================================================================
def _cuda_driver_missing():
    """Why CUDA cannot work here (a short reason), or None when a driver is present."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider"
    lib = "nvcuda.dll" if platform.system() == "Windows" else "libcuda.so.1"
    try:
        ctypes.CDLL(lib)
    except OSError:
        return f"no NVIDIA driver ({lib} not found)"
    return None


@contextlib.contextmanager
def _quiet_ort():
    """Silence onnxruntime's logger (a failed CUDA provider prints a screen of errors)."""
    ort.set_default_logger_severity(4)
    try:
        yield
    finally:
        ort.set_default_logger_severity(3)  # keep errors; drop the provider-placement warnings


def open_session(path, provider="auto", threads=None):
    """An InferenceSession on the best provider that really works.

    provider: 'auto' (CUDA when it starts, else CPU), 'cuda' (required) or 'cpu'.
    Returns (session, note): note is a one-line explanation when 'auto' fell back to
    the CPU although this onnxruntime lists CUDA, else None. get_available_providers()
    lists CUDA whenever onnxruntime-gpu is installed, driver or not, so the decision
    is taken from the providers the created session actually holds."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or _cpu_count()
    so.log_severity_level = 3
    note = None
    if provider == "cpu":
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), None
    reason = _cuda_driver_missing()
    if reason is None:
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* pip packages (torch's CUDA build)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
                ort.preload_dlls()
        with _quiet_ort():
            sess = ort.InferenceSession(str(path), so, providers=["CUDAExecutionProvider",
                                                                  "CPUExecutionProvider"])
        if sess.get_providers()[0] == "CUDAExecutionProvider":
            return sess, None
        cuda = getattr(getattr(ort.capi, "build_and_package_info", None), "cuda_version", "?")
        reason = f"onnxruntime could not start CUDA (it needs CUDA {cuda} and cuDNN 9 libraries)"
    elif provider == "auto" and reason.startswith("this onnxruntime build"):
        reason = None  # a CPU-only onnxruntime: nothing was asked for, nothing to explain
    if provider == "cuda":
        raise ModelError(f"--provider cuda: {reason}")
    if reason:
        note = f"note: {reason}; running on the CPU"
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]), note


def _ort_message(e):
    """The readable part of an onnxruntime exception: one line, without the C++ source
    location and function signature it embeds."""
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "/onnxruntime_src/" in msg:
        head, _, tail = msg.partition("/onnxruntime_src/")
        msg = head + tail.rpartition(") ")[2]
    return msg[:300]


def _cpu_count():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_model(path, provider="auto", threads=None):
    """Open an exported model and check that it is ours: (session, metadata, note).

    metadata holds 'classes' (list), 'palette' ((C, 3) uint8) and the raw strings."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: model file not found (make one with `python export_onnx.py export`)")
    if p.stat().st_size == 0:
        raise ModelError(f"{p}: empty file (0 bytes), expected an ONNX model from export_onnx.py")
    try:
        sess, note = open_session(p, provider, threads)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(f"{p}: not an ONNX model onnxruntime can load ({_ort_message(e)})") from None
    meta = dict(sess.get_modelmeta().custom_metadata_map)
    if meta.get("bismap_format") != FORMAT:
        raise ModelError(f"{p}: an ONNX model, but not a BiSMAP export (metadata 'bismap_format' is "
                         f"{meta.get('bismap_format')!r}, expected {FORMAT!r}; keys found: "
                         f"{sorted(meta)[:8]}): export one with `python export_onnx.py export`")
    ins, outs = sess.get_inputs(), {o.name: o for o in sess.get_outputs()}
    if (len(ins) != 1 or ins[0].name != "image" or ins[0].type != "tensor(uint8)"
            or len(ins[0].shape) != 4 or ins[0].shape[3] != 3 or set(outs) != {"label", "probs"}):
        raise ModelError(f"{p}: metadata says BiSMAP but the graph is not: expected input 'image' "
                         f"uint8 (B, H, W, 3) and outputs 'label', 'probs'; found inputs "
                         f"{[(i.name, i.type, i.shape) for i in ins]}, outputs {sorted(outs)}")
    try:
        classes = json.loads(meta["classes"])
        palette = np.array(json.loads(meta["palette"]), dtype=np.uint8).reshape(len(classes), 3)
    except (KeyError, ValueError) as e:
        raise ModelError(f"{p}: BiSMAP metadata 'classes'/'palette' unreadable ({e})") from None
    meta.update(classes=classes, palette=palette)
    return sess, meta, note


# ============================================================================
# Images in, label maps out (numpy + pillow)
# ============================================================================
def load_rgb(path):
    """Any image file -> RGB uint8 (H, W, 3); one clear ImageError when it is unusable.

    Greyscale, palette, CMYK and RGBA (alpha dropped) are converted; 16-bit greyscale
    is scaled to 8 bits; the EXIF orientation of phone photos is applied."""
    p = Path(path)
    if not p.is_file():
        raise ImageError("not found" if not p.exists() else "not a regular file")
    if p.stat().st_size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with Image.open(p) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im, dtype=np.float64)
                a = a / 257.0 if a.max() > 255 else a  # 16-bit range -> 8 bits
                im = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
            rgb = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        raise ImageError("not an image (pillow does not recognise the format)") from None
    except Exception as e:  # truncated / corrupt data, decompression-bomb guard, ...
        raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
    if rgb.size == 0:
        raise ImageError(f"image has zero size ({rgb.shape[1]}x{rgb.shape[0]})")
    return np.ascontiguousarray(rgb)


def window_starts(length, window, stride):
    """Start offsets of windows of `window` pixels every `stride` pixels covering
    0..length; the last window is shifted back to end exactly at `length`."""
    if length <= window:
        return [0]
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] + window < length:
        starts.append(length - window)
    return starts


def run_image(sess, rgb, max_side=None, window=None, overlap=1 / 3):
    """Label one RGB uint8 (H, W, 3) image -> (H, W) uint8 trainIds.

    max_side: resize so the long side is at most this (bilinear, antialiased), label,
    and map the labels back with nearest neighbour. window: slide a window x window
    tile with `overlap` and average the class probabilities where tiles overlap."""
    h, w = rgb.shape[:2]
    x = rgb
    if max_side and max(h, w) > max_side:
        s = max_side / max(h, w)
        size = (max(1, round(w * s)), max(1, round(h * s)))
        x = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))
    if window and max(x.shape[:2]) > window:
        label = _run_windows(sess, x, window, max(1, int(window * (1 - overlap))))
    else:
        label = sess.run(["label"], {"image": x[None]})[0][0]      # (h, w) uint8
    if label.shape != (h, w):
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return label


def _run_windows(sess, x, window, stride):
    """Sliding-window inference: summed probabilities, then argmax. Memory: the sum
    holds C float32 values per pixel (76 bytes/pixel for 19 classes)."""
    h, w = x.shape[:2]
    acc = None
    for y0 in window_starts(h, window, stride):
        for x0 in window_starts(w, window, stride):
            tile = x[y0:y0 + window, x0:x0 + window]
            probs = sess.run(["probs"], {"image": tile[None]})[0][0]   # (C, th, tw)
            if acc is None:
                acc = np.zeros((probs.shape[0], h, w), np.float32)     # (C, H, W)
            acc[:, y0:y0 + tile.shape[0], x0:x0 + tile.shape[1]] += probs
    return acc.argmax(0).astype(np.uint8)  # equal tile counts per pixel across classes: no division needed


def blend(rgb, color, alpha=0.5):
    """The colourised mask over the photo (alpha of the mask)."""
    return ((1 - alpha) * rgb.astype(np.float32) + alpha * color.astype(np.float32)).round().astype(np.uint8)


def _save_png(path, array, text=None):
    """Write a PNG atomically (temporary name in the same folder, then rename)."""
    from PIL import PngImagePlugin
    path = Path(path)
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for k, v in text.items():
            info.add_text(k, v)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        raise _write_error(path, e) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def check_out_dir(out):
    """Create --out and prove that a file can be written in it, or raise WriteError."""
    out = Path(out)
    probe = out / f".tmp-{uuid.uuid4().hex[:8]}-probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
    except OSError as e:
        raise _write_error(out, e) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


def collect_inputs(paths, out_dir):
    """Expand files and folders into [(image path, output stem relative to out_dir)].

    Folders are searched recursively for image extensions (subfolders are mirrored in
    out_dir; anything inside out_dir itself is skipped, so a rerun never labels its own
    outputs). Files named explicitly are always tried, whatever their extension.
    Returns (items, missing paths, number of non-image files skipped in folders)."""
    out_dir = Path(out_dir).resolve()
    items, missing, skipped, seen = [], [], 0, set()

    def add(p, stem):
        k, n = stem, 2
        while k in seen:  # two inputs with the same name: keep both
            k, n = f"{stem}_{n}", n + 1
        seen.add(k)
        items.append((p, k))
    for arg in paths:
        a = Path(arg)
        if a.is_dir():
            for p in sorted(a.rglob("*")):
                if not p.is_file() or p.name.startswith(".") or out_dir in p.resolve().parents:
                    continue
                if p.suffix.lower() not in IMAGE_EXTS:
                    skipped += 1
                    continue
                add(p, str(p.relative_to(a).with_suffix("")))
        elif a.exists():
            add(a, a.stem)
        else:
            missing.append(a)
    return items, missing, skipped


def predict_main(argv):
    p = argparse.ArgumentParser(
        prog="export_onnx.py predict",
        description="Label street images with an exported BiSMAP model (onnxruntime only).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--model", default="work/export/bismap.onnx", help="an ONNX file written by `export`")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("--provider", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when it really starts, else the CPU (with a one-line note)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--max-side", type=int, default=None,
                   help="resize so the long side is at most this many pixels (labels mapped back)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window of this many pixels (1/3 overlap) for very large images")
    p.add_argument("--alpha", type=float, default=0.5, help="mask opacity in the overlay")
    p.add_argument("--skip-existing", action="store_true",
                   help="skip images whose three outputs exist (outputs are written atomically)")
    p.add_argument("--debug", action="store_true", help="show the traceback of an expected error")
    a = p.parse_args(argv)
    try:
        sess, meta, note = load_model(a.model, a.provider, a.threads)
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    out = Path(a.out)
    try:
        check_out_dir(out)
    except WriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    items, missing, skipped = collect_inputs(a.images, out)
    failed = [(m, "not found") for m in missing]
    for m in missing:
        print(f"error: {m}: not found", file=sys.stderr)
    if skipped:
        print(f"({skipped} file(s) without an image extension skipped in the folders)", file=sys.stderr)
    palette = meta["palette"]
    lut = np.zeros((256, 3), np.uint8)
    lut[:len(palette)] = palette
    text = {"bismap_model": str(a.model), "bismap_checkpoint": meta.get("source_checkpoint", ""),
            "bismap_classes": ",".join(meta["classes"])}
    done, t0 = 0, time.time()
    for path, stem in tqdm(items, desc="predict", unit="img", disable=len(items) < 2):
        files = [out / f"{stem}_{k}.png" for k in ("label", "color", "overlay")]
        if a.skip_existing and all(f.exists() for f in files):
            continue
        try:
            rgb = load_rgb(path)
            try:
                label = run_image(sess, rgb, a.max_side, a.window)
            except Exception as e:  # out of memory on a huge photo, ...
                raise ImageError(f"onnxruntime failed on a {rgb.shape[1]}x{rgb.shape[0]} image "
                                 f"({_ort_message(e)}); "
                                 f"for very large images try --max-side 2048 or --window 1024") from None
            color = lut[label]                                            # (H, W, 3)
            _save_png(files[0], label, text)
            _save_png(files[1], color)
            _save_png(files[2], blend(rgb, color, a.alpha))
            done += 1
        except ImageError as e:
            failed.append((path, str(e)))
            tqdm.write(f"error: {path}: {e}", file=sys.stderr)
        except WriteError as e:  # the disk filled up, the folder went away: stop here
            failed.append((path, str(e)))
            tqdm.write(f"error: {e}; stopped after {done} image(s)", file=sys.stderr)
            break
    dt = time.time() - t0
    prov = sess.get_providers()[0]
    print(f"{done} image(s) labelled in {dt:.1f} s ({done / max(dt, 1e-9):.2f} images/s, {prov}), "
          f"{len(failed)} failed; outputs in {out}/")
    return 1 if failed else 0


# ============================================================================
# Export (torch is imported only here)
# ============================================================================
def pick_checkpoint(work):
    """The model.pt of the latest pipeline stage (06, then 05, then 02) whose manifest is
    complete: the distilled student is the paper's final model. Returns (stage, path)."""
    import common
    tried = []
    for stage in PRODUCERS:
        try:
            common.read_manifest(work, stage)
        except common.StageError:
            tried.append(f"{stage} not finished")
            continue
        ck = common.stage_dir(work, stage) / "model.pt"
        if ck.exists():
            return stage, ck
        tried.append(f"{ck} missing")
    raise common.StageError(f"no finished model under {work}/ ({', '.join(tried)}): run 02_warmup.py "
                            f"(then 05_selftrain.py, 06_distill.py) first, or pass --checkpoint PATH")


def build_deployable(model):
    """Wrap a DeepLabV3Plus as the deployed graph: uint8 NHWC in, (label, probs) out."""
    import torch
    import torch.nn.functional as F

    import common

    class Deployable(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, image):                                   # (B, H, W, 3) uint8
            x = image.permute(0, 3, 1, 2)                           # (B, 3, H, W) uint8
            logits = self.net(common.normalize(x))[1].float()       # (B, C, H/4, W/4)
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                                   align_corners=False)             # (B, C, H, W), as predict_logits
            return logits.argmax(1).to(torch.uint8), logits.softmax(1)  # (B, H, W), (B, C, H, W)
    return Deployable(model).eval()


def export_graph(model, path, opset=17):
    """torch.onnx.export (TorchScript exporter; the dynamo one needs onnxscript) with a
    dynamic batch, height and width. In eval mode the exporter folds BatchNorm into the
    convolutions, so the graph holds Conv/Relu/Resize and no BatchNormalization."""
    import warnings

    import torch
    wrapped = build_deployable(model)
    dummy = torch.zeros(1, 64, 96, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation and tracer notes
        torch.onnx.export(wrapped, (dummy,), str(path), input_names=["image"],
                          output_names=["label", "probs"], opset_version=opset, dynamo=False,
                          do_constant_folding=True,
                          dynamic_axes={"image": {0: "batch", 1: "height", 2: "width"},
                                        "label": {0: "batch", 1: "height", 2: "width"},
                                        "probs": {0: "batch", 2: "height", 3: "width"}})


def add_metadata(path, meta, num_classes):
    """Embed string metadata, document the input/outputs, state the class dimension of
    'probs' (the tracer leaves it symbolic), and run onnx.checker."""
    import onnx
    m = onnx.load(str(path))
    probs = next(o for o in m.graph.output if o.name == "probs")
    probs.type.tensor_type.shape.dim[1].dim_value = num_classes
    onnx.helper.set_model_props(m, {k: str(v) for k, v in meta.items()})
    m.doc_string = "BiSMAP DeepLabV3+ segmentor (trainIds, Cityscapes classes); see export_onnx.py"
    docs = {"image": "uint8 (B, H, W, 3) RGB 0..255; scaling and ImageNet normalisation are in the graph",
            "label": "uint8 (B, H, W) argmax trainIds 0..18",
            "probs": "float32 (B, 19, H, W) class probabilities at the input size"}
    for v in list(m.graph.input) + list(m.graph.output):
        v.doc_string = docs.get(v.name, "")
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(path))


def compare_outputs(ref_probs, probs, label, tol):
    """Compare onnxruntime outputs with the PyTorch reference.

    ref_probs (B, C, H, W) float; probs (B, C, H, W); label (B, H, W).
    If every probability differs by at most tol, an argmax can only flip where the
    reference's top-2 probabilities are within 2 * tol of each other; a label
    difference anywhere else is counted as 'unexplained' (a real mismatch)."""
    ref_label = ref_probs.argmax(1)
    top2 = np.sort(ref_probs, axis=1)[:, -2:]                       # (B, 2, H, W)
    margin = top2[:, 1] - top2[:, 0]                                # (B, H, W)
    differ = ref_label != label
    return {"max_prob_diff": float(np.abs(probs.astype(np.float64) - ref_probs).max()),
            "label_agreement": float(1 - differ.mean()),
            "label_diff_pixels": int(differ.sum()),
            "unexplained_label_diffs": int((differ & (margin > 2 * tol)).sum())}


def validate(onnx_path, model, images, sizes, tol=DEFAULT_TOL):
    """Run onnxruntime (CPU) beside common.predict_logits (the project's evaluation path)
    on each image at each size, and on a batch of two. Raise ExportError beyond tol.

    images: list of RGB uint8 arrays; sizes: list of (W, H) or None (native size).
    Returns the rows of the report."""
    import torch

    import common
    sess, _ = open_session(onnx_path, "cpu")
    device = next(model.parameters()).device

    def check(batch, name):
        x = np.stack(batch)                                          # (B, H, W, 3) uint8
        with torch.no_grad():
            t = torch.from_numpy(x).permute(0, 3, 1, 2).to(device)   # (B, 3, H, W)
            ref = common.predict_logits(model, t).softmax(1).cpu().numpy()
        label, probs = sess.run(["label", "probs"], {"image": x})
        b, h, w = x.shape[:3]
        if label.dtype != np.uint8 or label.shape != (b, h, w) or probs.dtype != np.float32 \
                or probs.shape != ref.shape:
            raise ExportError(f"{onnx_path}: outputs have the wrong type or shape: label {label.dtype} "
                              f"{label.shape}, probs {probs.dtype} {probs.shape}; expected uint8 "
                              f"{(b, h, w)} and float32 {ref.shape}")
        return {"image": name, "size": f"{w}x{h}", "batch": b, **compare_outputs(ref, probs, label, tol)}

    def resize(img, size):
        return img if size is None else np.asarray(Image.fromarray(img).resize(size, Image.BILINEAR))
    rows = [check([resize(img, s)], f"#{i}") for i, img in enumerate(images) for s in sizes]
    native = (images[0].shape[1], images[0].shape[0])
    odd = min((s for s in sizes if s is not None), key=lambda s: s[0] * s[1], default=native)
    two = [resize(images[i % len(images)], odd) for i in range(2)]
    if len(images) == 1:
        two[1] = two[1][::-1].copy()  # a different second image: the first one flipped upside down
    rows.append(check(two, "#0+#1"))
    print(f"{'image':>6} {'size':>10} {'batch':>5} {'max|dp|':>9} {'labels agree':>13}")
    for r in rows:
        print(f"{r['image']:>6} {r['size']:>10} {r['batch']:>5} {r['max_prob_diff']:9.2e} "
              f"{100 * r['label_agreement']:12.4f}%")
    bad = [r for r in rows if r["max_prob_diff"] > tol or r["unexplained_label_diffs"]]
    if bad:
        raise ExportError(f"{onnx_path}: onnxruntime disagrees with PyTorch beyond float32 noise "
                          f"(tolerance {tol:g} on probabilities): " + "; ".join(
                              f"{r['image']} {r['size']} batch {r['batch']}: max|dp| "
                              f"{r['max_prob_diff']:.3g}, {r['unexplained_label_diffs']} label "
                              f"differences at confident pixels" for r in bad))
    return rows


def _parse_size(s):
    if s == "native":
        return None
    try:
        w, h = (int(v) for v in s.lower().split("x"))
        assert w > 0 and h > 0
        return (w, h)
    except (ValueError, AssertionError):
        raise argparse.ArgumentTypeError(f"size must be WxH (e.g. 1914x1052) or 'native', got {s!r}") from None


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_main(argv):
    import torch

    import common
    p = common.base_parser(__doc__)
    g = p.add_argument_group("export")
    g.add_argument("--checkpoint", default=None,
                   help="a model.pt of 02/05/06 (default: the latest of 06_distill, 05_selftrain, "
                        "02_warmup under --work whose manifest is complete)")
    g.add_argument("--opset", type=int, default=17, help="ONNX opset (17: onnxruntime >= 1.11)")
    g.add_argument("--val-images", type=int, default=2, help="Cityscapes val images used to validate")
    g.add_argument("--images", nargs="+", default=None,
                   help="validate on these images instead of Cityscapes val (no --data needed)")
    g.add_argument("--val-sizes", nargs="+", type=_parse_size,
                   default=[None, (1914, 1052), (700, 500)], metavar="WxH",
                   help="sizes each validation image is resized to ('native' = as stored); "
                        "not multiples of 16 on purpose (default: native 1914x1052 700x500)")
    g.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help="largest allowed |p_onnx - p_torch|. The engines sum convolutions in a "
                        "different order (and the exporter folds BatchNorm into the weights), so "
                        "float32 rounding leaves ~1e-7..1e-5 on the probabilities of a trained "
                        "model; an export bug (layout, normalisation, resize mode) moves them by "
                        "1e-2 or more. (A random-weight resnet101, whose logits reach ~1e3 without "
                        "trained BatchNorm statistics, shows ~2e-3 at near-tie pixels: raise --tol "
                        "for such smoke tests.)")
    args = p.parse_args(argv)
    common.seed_everything(args.seed)
    device = common.pick_device(args.device)
    if device.type == "cuda":  # the reference must be float32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    stage = common.Stage(args, "export")

    # ============ the checkpoint and its manifest ============
    if args.checkpoint:
        ckpt_path, producer = Path(args.checkpoint), None
        mpath = ckpt_path.parent / "manifest.json"
        manifest = json.loads(mpath.read_text()) if mpath.exists() else None
        if manifest is not None and not manifest.get("complete"):
            manifest = None
        if manifest is None:
            common.log0(f"warning: no complete manifest.json beside {ckpt_path}: mIoU unknown")
    else:
        producer, ckpt_path = pick_checkpoint(args.work)
        manifest = stage.use(producer)
    # ============ nothing changed since the last export: keep it ============
    # (same arguments and upstream run, the same checkpoint bytes, the ONNX file as written;
    # a rerun of demo.py would otherwise export and validate again, about a minute on a CPU)
    out = stage.dir / ONNX_NAME
    done = stage.finished_unchanged()
    if (done and out.exists() and done.get("metadata", {}).get("checkpoint_sha256") == _sha256(ckpt_path)
            and done["summary"].get("sha256") == _sha256(out)):
        common.log0(f"{out} is up to date: exported from {ckpt_path} with these arguments, and "
                    f"neither file changed since (--resume never exports again)")
        return 0
    model, ckpt = common.model_from_checkpoint(ckpt_path, "cpu", producer)
    a = ckpt.get("args", {})
    source = a.get("source", args.source)
    summary_in = (manifest or {}).get("summary", {})
    miou = summary_in.get("target_miou")  # what 02, 05 and 06 record (06: its last round)
    common.log0(f"exporting {ckpt_path} ({a['backbone']}, {source}, target val mIoU "
                f"{'unknown' if miou is None else f'{miou:.2f}'})")

    # ============ the validation images ============
    if args.images:
        val_paths = [Path(x) for x in args.images]
    else:
        try:
            val_paths = [pth for pth, _ in common.target_val_items(args.data)][:args.val_images]
        except common.DataError as e:
            raise common.DataError(f"{e}\n(the export is validated on a few target images: give "
                                   f"--data, or --images photo1.png photo2.jpg)") from None
    images = [common.read_image(x) for x in val_paths]

    # ============ export, metadata, checker, validation; then the atomic rename ============
    stage.begin()
    stage.add_input(ckpt_path)
    meta = {"bismap_format": FORMAT,
            "classes": json.dumps(list(common.CLASSES)),
            "palette": json.dumps(common.PALETTE.tolist()),
            "ignore_index": common.IGNORE,
            "input": "image: uint8 (B, H, W, 3) RGB 0..255 (NHWC); scaling and ImageNet "
                     "normalisation inside the graph",
            "outputs": "label: uint8 (B, H, W) trainIds; probs: float32 (B, C, H, W)",
            "normalization": json.dumps({"mean": common.IMAGENET_MEAN, "std": common.IMAGENET_STD}),
            "backbone": a["backbone"], "source_domain": source,
            "source_checkpoint": str(ckpt_path), "checkpoint_sha256": _sha256(ckpt_path),
            "checkpoint_stage": producer or (manifest or {}).get("stage", "unknown"),
            "checkpoint_iteration": ckpt.get("iteration", ""),
            "miou": "unknown" if miou is None else f"{miou:.2f}",
            "miou_classes": common.SOURCE_EVAL_SETS[source][0],
            "code_revision": common.code_revision() or "unknown",
            "torch_version": torch.__version__, "exported": common.now()}
    t0 = time.time()
    with common.atomic_write(out) as tmp:
        export_graph(model, tmp, args.opset)
        add_metadata(tmp, meta, common.NUM_CLASSES)
        common.log0(f"exported and checked in {time.time() - t0:.1f} s; validating against PyTorch "
                    f"on {len(images)} image(s), tolerance {args.tol:g}")
        rows = validate(tmp, model.to(device), images, args.val_sizes, args.tol)
    size_mb = out.stat().st_size / 2 ** 20
    summary = {"onnx": str(out), "size_mb": round(size_mb, 1), "sha256": _sha256(out),
               "checkpoint": str(ckpt_path), "checkpoint_stage": meta["checkpoint_stage"],
               "backbone": a["backbone"], "miou": miou, "opset": args.opset, "tolerance": args.tol,
               "max_prob_diff": max(r["max_prob_diff"] for r in rows),
               "min_label_agreement": min(r["label_agreement"] for r in rows)}
    stage.finish(summary, validation=rows, validation_images=[str(x) for x in val_paths],
                 metadata=meta)
    common.log0(f"wrote {out} ({size_mb:.1f} MB): max |p_onnx - p_torch| {summary['max_prob_diff']:.2e}, "
                f"label agreement >= {100 * summary['min_label_agreement']:.4f}%")
    return 0


# ============================================================================
# Command line
# ============================================================================
def main(argv=None):
    """`export` (the default) or `predict`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "predict":
            return predict_main(argv[1:])
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__ + "\nsubcommands: export (default; `export_onnx.py export -h`), "
                  "predict (`export_onnx.py predict -h`)")
            return 0
        return export_main(argv[1:] if argv and argv[0] == "export" else argv)
    except Exception as e:  # expected errors: one line (the traceback with --debug)
        if "--debug" in argv or not _expected(e):
            raise
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1


def _expected(e):
    """Bad input, a missing stage, an unwritable output: not a bug (common's list when the
    export path has imported it; predict never imports common or torch)."""
    ours = (ModelError, ImageError, ExportError, WriteError, FileNotFoundError, PermissionError,
            IsADirectoryError, NotADirectoryError)
    common = sys.modules.get("common")
    return isinstance(e, ours + (tuple(common.EXPECTED_ERRORS) if common else ()))


if __name__ == "__main__":
    sys.exit(main())

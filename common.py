"""Shared plumbing for the BiSMAP stages (see README.md and the paper).

Only what two or more stages need lives here, in banner-separated sections:
labels, dataset readers, joint transforms, the DeepLabV3+ model, metrics,
stage folders / manifests / atomic I/O, seeding and devices, distributed
helpers, the shared losses (Eq. (10), (11)) and the shared training loop.
"""
import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

IGNORE = 255

# ============================================================================
# Labels and palettes
# ============================================================================
CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "light", "sign",
           "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus",
           "train", "motorcycle", "bicycle")
NUM_CLASSES = len(CLASSES)  # 19
PALETTE = np.array([
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70),
    (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32)], dtype=np.uint8)

# Cityscapes labelId -> trainId (GTA5 uses the same ids). Everything else -> 255.
CITYSCAPES_ID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8,
                          22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15,
                          31: 16, 32: 17, 33: 18}
TRAIN_TO_CITYSCAPES_ID = {t: i for i, t in CITYSCAPES_ID_TO_TRAIN.items()}
# SYNTHIA-RAND-CITYSCAPES class id (R channel of GT/LABELS) -> trainId: the official
# table (luyvlei/BiSMAPs data/synthia_dataset.py l.104-106, the same in ProDA), which also
# maps SYNTHIA's terrain (16), truck (18) and train (20), classes that are rare in SYNTHIA
# and that the 16/13-class protocol leaves out of the mean. Effect: such pixels train those
# classes instead of being ignored (so the model may predict terrain/truck/train on the
# target, and such a prediction is a miss for the true class); the evaluation itself is
# unchanged (EVAL_CLASSES["16"] and ["13"] never include them). Ids 0 (void), 13
# (parking slot), 14 (road work), 22 (lane marking) stay ignored (255).
SYNTHIA_ID_TO_TRAIN = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10,
                       10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}

# Ids a label file may hold besides those mapped above (they decode to 255 = ignore).
# Anything else is an error (decode_label): a label in another convention (e.g. trainIds
# where labelIds are expected) must not silently train on mostly ignored pixels.
# Cityscapes labelIds: cityscapesscripts helpers/labels.py defines 0..33; its license plate
# (-1) is never drawn into *_gtFine_labelIds.png (preparation/json2labelImg.py skips
# negative ids). GTA5 uses the same ids, and some of its label files also hold 34
# (ProDA data/gta5_dataset.py lists 34 among GTA5's void classes).
CITYSCAPES_VOID_IDS = {0: "unlabeled", 1: "ego vehicle", 2: "rectification border", 3: "out of roi",
                       4: "static", 5: "dynamic", 6: "ground", 9: "parking", 10: "rail track",
                       14: "guard rail", 15: "bridge", 16: "tunnel", 18: "polegroup",
                       29: "caravan", 30: "trailer", 34: "license plate (GTA5)"}
# SYNTHIA-RAND-CITYSCAPES class ids 0..22 (the dataset's README); those without a trainId
# in SYNTHIA_ID_TO_TRAIN (the 16-class protocol leaves terrain, truck, train out).
SYNTHIA_NAMES = ("void", "sky", "building", "road", "sidewalk", "fence", "vegetation", "pole",
                 "car", "traffic sign", "pedestrian", "bicycle", "motorcycle", "parking-slot",
                 "road-work", "traffic light", "terrain", "rider", "truck", "bus", "train", "wall",
                 "lanemarking")

# Evaluation class sets (trainIds). SYNTHIA has no terrain, truck, train (16 classes);
# the 13-class protocol also drops wall, fence and pole.
EVAL_CLASSES = {
    "19": tuple(range(19)),
    "16": tuple(c for c in range(19) if c not in (9, 14, 16)),
    "13": tuple(c for c in range(19) if c not in (3, 4, 5, 9, 14, 16)),
}
# Which class sets each source reports (the first one is the headline mIoU).
SOURCE_EVAL_SETS = {"gta5": ("19",), "synthia": ("16", "13")}

# The size each dataset is brought to before the random scale (Sec. 4.2 and the official
# data pipeline), as factors of its native size so that the toy data (same formats,
# smaller) get the same treatment:
#   GTA5 1914x1052 -> 2200x1209: the official loader resizes to 1914x1052, then its
#     RandomSized draws the width as U(0.5, 1.5) x 2200 keeping the aspect ratio
#     (luyvlei/BiSMAPs configs/gta5_st.yml l.16-17 and l.27, augmentations/augmentations.py
#     RandomSized), i.e. the scale is relative to 2200 px, not 1914;
#   SYNTHIA 1280x760 -> 2048x1024 ("uniformly resized to 2,048 x 1,024 before the random
#     scale", Sec. 4.2; the aspect ratio changes);
#   Cityscapes 2048x1024 -> 2048x1024 (configs/gta5_st.yml l.38-39 and l.48: rsize 2048).
BASE_RESIZE = {"gta5": (2200 / 1914, 2200 / 1914), "synthia": (2048 / 1280, 1024 / 760),
               "cityscapes": (1.0, 1.0), "trainid": (1.0, 1.0)}


def make_lut(mapping):
    """A 65536-entry lookup table raw id -> trainId (255 elsewhere)."""
    lut = np.full(65536, IGNORE, dtype=np.uint8)
    for raw, train in mapping.items():
        lut[raw] = train
    return lut


CITYSCAPES_LUT = make_lut(CITYSCAPES_ID_TO_TRAIN)
SYNTHIA_LUT = make_lut(SYNTHIA_ID_TO_TRAIN)


def known_ids_lut(*id_sets):
    """A 65536-entry boolean table: True for the raw ids a label file may hold."""
    ok = np.zeros(65536, dtype=bool)
    for ids in id_sets:
        ok[list(ids)] = True
    return ok


# the accepted ids, derived from the tables above (so a change there flows through)
LABEL_IDS_KNOWN = {
    "cityscapes": known_ids_lut(CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_VOID_IDS),
    "gta5": known_ids_lut(CITYSCAPES_ID_TO_TRAIN, CITYSCAPES_VOID_IDS),
    "synthia": known_ids_lut(SYNTHIA_ID_TO_TRAIN, range(len(SYNTHIA_NAMES))),
}


def trainid_to_labelid(label):
    """(H, W) trainIds -> Cityscapes labelIds (255 -> 0 'unlabeled'), the format the
    official Cityscapes evaluator reads for predictions."""
    lut = np.zeros(256, np.uint8)
    for t, i in TRAIN_TO_CITYSCAPES_ID.items():
        lut[t] = i
    return lut[label]


def colorize(label):
    """(H, W) trainIds -> (H, W, 3) uint8 with the Cityscapes palette, ignore black."""
    pal = np.zeros((256, 3), np.uint8)
    pal[:NUM_CLASSES] = PALETTE
    return pal[label]


# ============================================================================
# Image and label files
# ============================================================================
_WARNED = set()


def warn(msg):
    """Print a warning line on stderr once per process (rank 0 only under torchrun)."""
    if msg not in _WARNED and get_rank() == 0:
        _WARNED.add(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class DataError(RuntimeError):
    """Bad input data: the message says which file, what was expected and found."""


def read_image(path):
    """RGB uint8 array (H, W, 3); greyscale, palette and RGBA are converted."""
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"{path}: cannot decode as an image ({type(e).__name__}: {e})") from None
    if arr.size == 0:
        raise DataError(f"{path}: image has zero size")
    return arr


def image_tensor(path, device="cpu"):
    """read_image as a (1, 3, H, W) uint8 tensor on `device` (the networks normalise it)."""
    return torch.from_numpy(read_image(path).copy()).permute(2, 0, 1)[None].to(device)


def image_size(path):
    """(W, H) from the file header only (fast)."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise DataError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from None


def read_png16(path):
    """A 16-bit (or 8-bit) PNG as stored, channels in R, G, B order.

    PIL truncates 16-bit RGB PNGs to 8 bits, so this uses OpenCV, which decodes them
    exactly (it returns BGR, reversed here)."""
    import cv2
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"{path}: cannot decode as a PNG label (missing or corrupt)")
    if arr.ndim == 3:
        arr = arr[..., :3][..., ::-1]
    return arr


def decode_label(path, kind):
    """Read a label file of dataset `kind` and return (H, W) uint8 trainIds (255 ignore).

    gta5: 8-bit palette PNG of Cityscapes labelIds; cityscapes: *_gtFine_labelIds.png;
    synthia: 16-bit 3-channel PNG, class id in the R channel; trainid: our own PNGs."""
    if kind == "synthia":
        raw = read_png16(path)
        raw = raw[..., 0] if raw.ndim == 3 else raw  # R channel holds the class id
        check_label_ids(path, raw, kind)
        return SYNTHIA_LUT[raw.astype(np.int64)]
    try:
        with Image.open(path) as im:
            im.load()
            raw = np.asarray(im) if im.mode in ("P", "L", "I;16", "I") else None
            mode = im.mode
    except FileNotFoundError:
        raise DataError(f"{path}: label not found") from None
    except Exception as e:
        raise DataError(f"{path}: cannot decode label ({type(e).__name__}: {e})") from None
    if raw is None:
        raise DataError(f"{path}: expected a single-channel (palette or greyscale) label PNG, "
                        f"found mode {mode}")
    if kind == "trainid":
        bad = (raw >= NUM_CLASSES) & (raw != IGNORE)
        if bad.any():
            raise DataError(f"{path}: label values must be trainIds 0..{NUM_CLASSES - 1} or 255, "
                            f"found {np.unique(raw[bad])[:5].tolist()}")
        return raw.astype(np.uint8)
    check_label_ids(path, raw, kind)
    return CITYSCAPES_LUT[raw.astype(np.int64)]


def check_label_ids(path, raw, kind):
    """Fail on ids that are neither a class nor a documented void id of `kind`
    (LABEL_IDS_KNOWN), naming the file, each id and how many pixels hold it."""
    if raw.dtype.kind not in "ui" or raw.size == 0:
        raise DataError(f"{path}: expected integer label ids, found dtype {raw.dtype}")
    raw = raw.astype(np.int64)
    if raw.min() >= 0 and raw.max() < 65536 and LABEL_IDS_KNOWN[kind][raw].all():
        return
    ids, counts = np.unique(raw, return_counts=True)
    known = LABEL_IDS_KNOWN[kind]
    bad = [(int(i), int(n)) for i, n in zip(ids, counts) if not (0 <= i < 65536 and known[i])]
    allowed = np.nonzero(known)[0]
    what = {"synthia": "SYNTHIA class ids (R channel)", "gta5": "Cityscapes labelIds",
            "cityscapes": "Cityscapes labelIds"}[kind]
    raise DataError(f"{path}: label id(s) that are neither a {kind} class nor a void id: "
                    + ", ".join(f"{i} ({n} pixels)" for i, n in bad[:10])
                    + f"; expected {what} in {allowed.tolist()}. Is the file in another "
                    f"convention (e.g. trainIds instead of labelIds)?")


def atomic_path(path):
    """A temporary name in the same folder (rename to `path` when complete)."""
    path = Path(path)
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


class WriteError(OSError):
    """A file could not be written (unwritable or full disk, a file where a folder should be):
    the message names the real path, never the temporary one."""


def write_error(path, e):
    """A WriteError naming `path` (the final name) and the system's reason."""
    reason = e.strerror or str(e) if isinstance(e, OSError) else str(e)
    code = getattr(e, "errno", None)
    hint = ("the disk is full: free some space" if code in (28, 27, 122)
            else "the write stopped part-way: check the disk's free space and any file-size limit"
            if code == 5 else "check that the folder exists, is a folder, and is writable")
    err = WriteError(f"cannot write {path}: {reason} ({hint})")
    err.errno = getattr(e, "errno", None)
    return err


DISK_NEARLY_FULL = 2 ** 28   # bytes: a failed write with less free than this was a full disk


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path; on success rename it to `path` (never a half file).
    An OSError while writing becomes a WriteError naming `path`; so does any other error
    raised while the disk has under 256 MiB free (writers such as torch.save and
    torch.onnx.export report a full disk as a RuntimeError)."""
    path = Path(path)
    tmp = atomic_path(path)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(path, e) from None
        try:
            yield tmp
            os.replace(tmp, path)
        except WriteError:
            raise
        except OSError as e:
            raise write_error(path, e) from None
        except Exception as e:
            free = shutil.disk_usage(path.parent).free
            if free < DISK_NEARLY_FULL:
                raise write_error(path, OSError(28, f"{type(e).__name__}: {e}; "
                                                    f"{free / 2**20:.0f} MiB free")) from None
            raise
    finally:
        with contextlib.suppress(OSError):
            if tmp.exists():
                tmp.unlink()


def save_png(path, array, palette=False):
    """Write a uint8 array as a lossless PNG, atomically. palette=True embeds the
    Cityscapes palette so a viewer shows colours while the values stay trainIds."""
    im = Image.fromarray(np.ascontiguousarray(array))
    if palette:
        im = im.convert("P") if im.mode != "P" else im
        pal = np.zeros((256, 3), np.uint8)
        pal[:NUM_CLASSES] = PALETTE
        im.putpalette(pal.flatten().tolist())
    with atomic_write(path) as tmp:
        im.save(tmp, format="PNG")


def save_npy(path, array):
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def save_npz(path, **arrays):
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def save_json(path, obj):
    with atomic_write(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def overlay(image, label, alpha=0.5):
    """Blend a colourised label over an RGB image (ignored pixels keep the photo)."""
    col = colorize(label).astype(np.float32)
    out = image.astype(np.float32)
    m = label != IGNORE
    out[m] = (1 - alpha) * out[m] + alpha * col[m]
    return out.clip(0, 255).astype(np.uint8)


# ============================================================================
# Dataset readers for the three real on-disk layouts
# ============================================================================
def _need_dir(path, what):
    if not Path(path).is_dir():
        raise DataError(f"{path} not found: expected {what} (run `python toy_data.py` for the "
                        f"toy datasets, or see README.md for the real layout)")


def _pairs(images, label_for, name, check_sizes):
    """Keep (image, label) pairs whose label exists and whose sizes agree; warn on the rest."""
    items, skipped = [], []
    for img in images:
        lab = label_for(img)
        if not lab.exists():
            skipped.append(f"{img}: no label at {lab}")
            continue
        if check_sizes:
            si, sl = image_size(img), image_size(lab)
            if si != sl:
                skipped.append(f"{img}: image is {si[0]}x{si[1]} but label {lab.name} is {sl[0]}x{sl[1]}")
                continue
        items.append((img, lab))
    for s in skipped[:20]:
        warn(f"{name}: skipping {s}")
    if len(skipped) > 20:
        warn(f"{name}: skipped {len(skipped)} pairs in all")
    if not items:
        raise DataError(f"{name}: no usable image/label pairs found")
    return items


def gta5_items(data, check_sizes=True):
    """GTA5: GTA5/images/*.png + GTA5/labels/*.png (same names, 8-bit palette labelIds)."""
    root = Path(data) / "GTA5"
    _need_dir(root / "images", "the GTA5 layout GTA5/images/*.png + GTA5/labels/*.png")
    imgs = sorted((root / "images").glob("*.png"))
    return _pairs(imgs, lambda p: root / "labels" / p.name, "GTA5", check_sizes)


def synthia_items(data, check_sizes=True):
    """SYNTHIA-RAND-CITYSCAPES: RGB/*.png + GT/LABELS/*.png (16-bit, id in R)."""
    root = Path(data) / "SYNTHIA" / "RAND_CITYSCAPES"
    _need_dir(root / "RGB", "the SYNTHIA layout SYNTHIA/RAND_CITYSCAPES/RGB + GT/LABELS")
    imgs = sorted((root / "RGB").glob("*.png"))
    return _pairs(imgs, lambda p: root / "GT" / "LABELS" / p.name, "SYNTHIA", check_sizes)


def cityscapes_items(data, split, with_labels=True, check_sizes=False):
    """Cityscapes: leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/.../*_gtFine_labelIds.png.
    Without labels, the label entry is None (target training images are unlabelled)."""
    root = Path(data) / "cityscapes"
    _need_dir(root / "leftImg8bit" / split, f"the Cityscapes layout leftImg8bit/{split}/<city>/")
    imgs = sorted((root / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))
    if not imgs:
        raise DataError(f"{root / 'leftImg8bit' / split}: no */*_leftImg8bit.png images")

    def label_for(p):
        return (root / "gtFine" / split / p.parent.name /
                p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
    if not with_labels:
        return [(p, None) for p in imgs]
    return _pairs(imgs, label_for, f"Cityscapes {split}", check_sizes)


def source_items(data, source, check_sizes=True):
    if source == "gta5":
        return gta5_items(data, check_sizes)
    if source == "synthia":
        return synthia_items(data, check_sizes)
    raise ValueError(f"--source must be gta5 or synthia, got {source!r}")


def item_name(path):
    """The file name artifacts are stored under (source/target images have unique names)."""
    return Path(path).name


# ============================================================================
# Joint image / label transforms (Sec. 4.2: scale 0.5-1.5, crop 896x512, flip, jitter)
# ============================================================================
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(img_u8):
    """(B, 3, H, W) or (3, H, W) uint8 tensor -> float, ImageNet-normalised."""
    x = img_u8.float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def joint_transform(img, masks, crop=None, scale=(0.5, 1.5), flip=True, jitter=0.0, base=(1.0, 1.0)):
    """Apply the same geometry to an image and its per-pixel maps.

    img: (3, H, W) uint8 tensor; masks: list of (H, W) uint8 tensors (labels, STM
    weights) resized with nearest neighbour and padded with 255 (labels) - callers
    treat padded pixels as ignored. base = (fx, fy): the base resize (BASE_RESIZE) done
    in the same resampling as the random scale s: the size becomes (W fx s, H fy s).
    crop = (W, H) or None. Colour jitter (brightness, contrast, saturation by `jitter`)
    touches the image only."""
    from torchvision.transforms.v2 import functional as TF

    def rnd():
        return torch.rand(()).item()
    _, h, w = img.shape
    base = tuple(base or (1.0, 1.0))
    if (scale is not None and tuple(scale) != (1.0, 1.0)) or base != (1.0, 1.0):
        s = scale[0] + (scale[1] - scale[0]) * rnd() if scale is not None else 1.0
        nh, nw = max(1, round(h * s * base[1])), max(1, round(w * s * base[0]))
        img = TF.resize(img, [nh, nw], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        masks = [TF.resize(m[None], [nh, nw], interpolation=TF.InterpolationMode.NEAREST)[0]
                 for m in masks]
        h, w = nh, nw
    if crop is not None:
        cw, ch = crop
        ph, pw = max(0, ch - h), max(0, cw - w)
        if ph or pw:
            img = F.pad(img, (0, pw, 0, ph), value=0)
            masks = [F.pad(m, (0, pw, 0, ph), value=IGNORE) for m in masks]
            h, w = h + ph, w + pw
        y0 = int(rnd() * (h - ch + 1))
        x0 = int(rnd() * (w - cw + 1))
        img = img[:, y0:y0 + ch, x0:x0 + cw]
        masks = [m[y0:y0 + ch, x0:x0 + cw] for m in masks]
    if flip and rnd() < 0.5:
        img = img.flip(-1)
        masks = [m.flip(-1) for m in masks]
    if jitter > 0:
        img = TF.adjust_brightness(img, 1 + jitter * (2 * rnd() - 1))
        img = TF.adjust_contrast(img, 1 + jitter * (2 * rnd() - 1))
        img = TF.adjust_saturation(img, 1 + jitter * (2 * rnd() - 1))
    return img.contiguous(), [m.contiguous() for m in masks]


class SegDataset(torch.utils.data.Dataset):
    """Image + label (+ extra per-pixel maps) with the joint transforms.

    items: list of (image_path, label_path or None); label_kind: how to decode labels;
    extra: {name: function image_path -> 8-bit PNG path} for maps that follow the image's
    geometry (e.g. the STM weights of 04). image_for maps an item to the image actually
    read (e.g. the stylized copy). Returns uint8 tensors: image (3, H, W), label (H, W),
    each extra map (H, W), and valid (H, W) bool: False on padding added by the crop."""

    def __init__(self, items, label_kind, crop=None, scale=(0.5, 1.5), flip=True, jitter=0.0,
                 extra=None, image_for=None, base=(1.0, 1.0)):
        self.items, self.label_kind = list(items), label_kind
        self.crop, self.scale, self.flip, self.jitter = crop, scale, flip, jitter
        self.extra, self.image_for, self.base = dict(extra or {}), image_for, base

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img, maps = self.load(i)
        img_t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
        maps_t = [torch.from_numpy(np.array(m, dtype=np.uint8)) for m in maps.values()]
        img_t, maps_t = joint_transform(img_t, maps_t, self.crop, self.scale, self.flip, self.jitter,
                                        self.base)
        out = {"image": img_t, "index": i, **dict(zip(maps, maps_t))}
        out["valid"] = out["valid"] == 1
        return out

    def load(self, i):
        """Item i as stored, decoded and checked: (image (H, W, 3), {name: (H, W) map})."""
        path, lab_path = self.items[i]
        img_path = self.image_for(path) if self.image_for else path
        img = read_image(img_path)
        h, w = img.shape[:2]
        maps = {"valid": np.ones((h, w), np.uint8)}
        if lab_path is not None:
            maps["label"] = decode_label(lab_path, self.label_kind)
        for name, fn in self.extra.items():
            p = Path(fn(path))
            if not p.exists():
                raise DataError(f"{p} not found (the {name} map of {img_path})")
            try:
                with Image.open(p) as im:
                    maps[name] = np.asarray(im)
            except Exception as e:
                raise DataError(f"{p}: cannot decode the {name} map ({type(e).__name__}: {e})") from None
        for name, m in maps.items():
            if m.shape != (h, w):
                raise DataError(f"{img_path}: the {name} map is {m.shape[1]}x{m.shape[0]} but the "
                                f"image is {w}x{h}")
        return img, maps


def check_readable(datasets, workers=0, rank=0, world=1, desc="checking images"):
    """Decode every file the datasets will read (images, labels, extra maps; no transform)
    before training, in parallel threads with a progress bar, and raise one DataError
    listing every unreadable item. datasets: SegDatasets, or lists of (image, label)
    items of Cityscapes val. Under torchrun each rank checks a share and all learn the result."""
    from concurrent.futures import ThreadPoolExecutor
    from tqdm import tqdm
    jobs = []
    for ds in datasets:
        if not isinstance(ds, SegDataset):
            ds = SegDataset(ds, "cityscapes", crop=None, scale=None, flip=False)
        jobs += [(ds, i) for i in range(len(ds))]
    mine = jobs[rank::world]

    def check(job):
        try:
            job[0].load(job[1])
            return None
        except DataError as e:
            return str(e)
    threads = max(1, workers or 1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        errors = [e for e in tqdm(pool.map(check, mine), total=len(mine), desc=desc,
                                  disable=rank != 0, leave=False) if e]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, errors)
        errors = [e for p in parts for e in p]
    if errors:
        shown = "\n  ".join(errors[:20]) + (f"\n  ... and {len(errors) - 20} more" if len(errors) > 20 else "")
        raise DataError(f"{len(errors)} of {len(jobs)} files this stage would read are unreadable:\n  "
                        f"{shown}\nReplace or remove them (a stylized image or STM map: rerun the "
                        f"stage that wrote it), then run again; nothing was changed.")


def image_loader(paths, workers):
    """Images decoded in loader workers, in order, one at a time (no crop, scale or flip):
    {"image": (3, H, W) uint8, "valid": ..., "index": k} for the per-image stages."""
    ds = SegDataset([(p, None) for p in paths], "trainid", crop=None, scale=None, flip=False)
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers)


def infinite_loader(dataset, batch_size, workers, seed, rank=0, world=1, start_epoch=0):
    """Yield batches forever, reshuffling every epoch (a DistributedSampler under DDP)."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=seed, drop_last=True)
    if len(dataset) < batch_size * world:
        raise DataError(f"dataset has {len(dataset)} images, fewer than one batch "
                        f"({batch_size} x {world} processes)")
    epoch = start_epoch
    while True:
        sampler.set_epoch(epoch)
        g = torch.Generator()
        g.manual_seed(seed * 100003 + epoch * 7919 + rank)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
            drop_last=True, generator=g, persistent_workers=False,
            worker_init_fn=_seed_worker)
        yield from loader
        epoch += 1


def _seed_worker(worker_id):
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


# ============================================================================
# DeepLabV3+ (ResNet backbone, output stride 16, ASPP 6/12/18)
# ============================================================================
BACKBONES = ("resnet101", "resnet50", "resnet34", "resnet18")


def build_resnet(name, weights="none", output_stride=16, flag="--weights"):
    """A torchvision ResNet with output stride 16 (layer4 dilated, not strided) or 32.

    weights: 'imagenet' (torchvision's weights API; downloads on first use), 'none',
    or a path to a torchvision-layout state dict, loaded strictly (`fc.` may be absent)."""
    import torchvision
    if name not in BACKBONES + ("resnet152",):
        raise ValueError(f"backbone must be one of {BACKBONES + ('resnet152',)}, got {name!r}")
    if output_stride not in (16, 32):
        raise ValueError(f"output stride must be 16 or 32, got {output_stride}")
    ctor = getattr(torchvision.models, name)
    tv_weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1 if weights == "imagenet" else None
    basic = name in ("resnet18", "resnet34")
    kw = {"replace_stride_with_dilation": [False, False, True]} if output_stride == 16 and not basic else {}
    try:
        net = ctor(weights=tv_weights, **kw)
    except Exception as e:  # no network, or a broken cache
        raise DataError(f"could not get torchvision's ImageNet weights for {name} "
                           f"({type(e).__name__}: {e}). On an offline machine pass {flag} PATH "
                           f"(a torchvision-layout state dict) or {flag} none.") from None
    if output_stride == 16 and basic:
        # BasicBlock refuses replace_stride_with_dilation: set layer4's stride and
        # dilation by hand (stride 2 -> 1, dilation 2) for output stride 16.
        blk = net.layer4[0]
        blk.conv1.stride = (1, 1)
        blk.downsample[0].stride = (1, 1)
        for b in net.layer4:
            for conv in (b.conv1, b.conv2):
                if conv is not blk.conv1:
                    conv.dilation, conv.padding = (2, 2), (2, 2)
    if weights not in ("imagenet", "none", None):
        load_state_strict(net, weights, what=f"{flag} {weights}", optional_prefixes=("fc.",))
    return net


class StateDictMismatch(DataError, KeyError):
    """A weights file whose keys or shapes do not match the model (a KeyError as before)."""

    def __str__(self):
        return str(self.args[0]) if self.args else ""


def load_state_strict(module, path_or_state, what="model", optional_prefixes=()):
    """Load a state dict and fail with the exact missing / unexpected keys.

    Keys starting with one of optional_prefixes may be absent (e.g. a classifier `fc.`
    that the backbone does not use). A 'module.' prefix (DDP) is stripped."""
    if isinstance(path_or_state, (str, Path)):
        p = Path(path_or_state)
        if not p.exists():
            raise FileNotFoundError(f"{what} weights {p} not found")
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(f"{p}: not a PyTorch state dict ({type(e).__name__}: {e})") from None
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
    else:
        state = path_or_state
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(optional_prefixes)]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
             for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shape:
        msg = [f"{what}: the state dict does not match"]
        if missing:
            msg.append(f"  missing keys ({len(missing)}): {missing[:10]}")
        if unexpected:
            msg.append(f"  unexpected keys ({len(unexpected)}): {unexpected[:10]}")
        if shape:
            msg.append(f"  shape mismatches ({len(shape)}): {shape[:10]}")
        raise StateDictMismatch("\n".join(msg))
    module.load_state_dict(state, strict=False)
    return module


# ============================================================================
# SimCLRv2 ResNets in the layout of the public converter (the paper's E-hat and student)
# ============================================================================
# The paper (Sec. 4.2) takes E-hat from a SimCLRv2 ResNet-152 and, after ProDA, starts the
# distillation student from a SimCLRv2 ResNet-101. Google publishes them as TensorFlow
# checkpoints (gs://simclr-checkpoints/simclrv2/pretrained/r152_1x_sk1, .../r101_1x_sk0);
# the public converter github.com/Separius/SimCLRv2-Pytorch (download.py, convert.py)
# writes `torch.save({'resnet': state_dict, 'head': state_dict}, 'r152_1x_sk1.pth')`, the
# file the official code loads (luyvlei/BiSMAPs source_transferability_map.py l.26-27,
# network in models/backbone/resnet_simclr.py). The module tree below reproduces that
# file's keys and shapes exactly (written here from the layout, not copied):
#   net.0            stem: sk0 = conv7x7/2 (net.0.0) + BN (net.0.1.0) + maxpool;
#                    sk1 = three conv3x3 (net.0.0, .2, .4), BNs at .1.0 .3.0 .5.0, maxpool
#   net.1 .. net.4   stages (torchvision's layer1..4); net.i.blocks.j is a bottleneck:
#     .projection.shortcut(.2).weight, .projection.bn.0.*   (first block: the shortcut;
#                    sk1: ZeroPad -> AvgPool(2, stride) -> conv1x1, sk0: conv1x1/stride)
#     .net.0 conv1x1, .net.1.0 BN, then sk0: .net.2 conv3x3/stride, .net.3.0 BN,
#     .net.4 conv1x1, .net.5.0 BN;  sk1: .net.2 selective kernel (main_conv.0 conv3x3 to
#     2C, main_conv.1.0 BN, mixing_conv.0 conv1x1, .1.0 BN, .2 conv1x1 to 2C),
#     .net.3 conv1x1, .net.4.0 BN
#   fc               Linear(2048 w, 1000), the supervised linear head (unused here)
# Every BatchNorm has eps 1e-5 (the TF code's BATCH_NORM_EPSILON). Inputs are RGB in
# [0, 1] with no mean/std normalisation (SimCLRv2's convention; the official 04 feeds
# mean 0, std 1: configs/gta5_stm.yml l.10-12).
SIMCLR_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
SIMCLR_SK_RATIO = 0.0625  # SimCLRv2's selective-kernel ratio (min 32 mixing channels)


def _simclr_conv(cin, cout, k=3, stride=1, dilation=1):
    return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k - 1) // 2,
                     dilation=dilation, bias=False)


def _simclr_bn(c, relu=True):
    """BN (key `0.*`) then ReLU or nothing (index 1 holds no tensor): the converter's
    BatchNormRelu."""
    return nn.Sequential(nn.BatchNorm2d(c, eps=1e-5), nn.ReLU(inplace=True) if relu else nn.Identity())


class SimCLRSelectiveKernel(nn.Module):
    """SK convolution (Li et al. 2019, as in SimCLRv2): one 3x3 conv gives two C-channel
    branches; a global descriptor of their sum is mixed by two 1x1 convs into per-channel
    softmax weights over the branches."""

    def __init__(self, cin, c, stride=1, dilation=1):
        super().__init__()
        mid = max(int(c * SIMCLR_SK_RATIO), 32)
        self.main_conv = nn.Sequential(_simclr_conv(cin, 2 * c, 3, stride, dilation), _simclr_bn(2 * c))
        self.mixing_conv = nn.Sequential(_simclr_conv(c, mid, 1), _simclr_bn(mid),
                                         _simclr_conv(mid, 2 * c, 1))

    def forward(self, x):
        a, b = self.main_conv(x).chunk(2, dim=1)                   # 2 x (B, C, H, W)
        g = (a + b).mean(dim=(2, 3), keepdim=True)                # (B, C, 1, 1)
        wa, wb = self.mixing_conv(g).chunk(2, dim=1)              # 2 x (B, C, 1, 1)
        w = torch.stack([wa, wb]).softmax(dim=0)                  # softmax over the 2 branches
        return a * w[0] + b * w[1]


class SimCLRProjection(nn.Module):
    """The first block's shortcut: conv1x1/stride + BN (sk0), or, with SK, a 2x2 average
    pool (stride = the block's stride, right/bottom zero-padded) + conv1x1 + BN."""

    def __init__(self, cin, cout, stride, sk):
        super().__init__()
        if sk:
            self.shortcut = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.AvgPool2d(2, stride),
                                          _simclr_conv(cin, cout, 1))
        else:
            self.shortcut = _simclr_conv(cin, cout, 1, stride)
        self.bn = _simclr_bn(cout, relu=False)

    def forward(self, x):
        return self.bn(self.shortcut(x))


class SimCLRBottleneck(nn.Module):
    def __init__(self, cin, c, stride, sk, projection, dilation=1):
        super().__init__()
        self.projection = SimCLRProjection(cin, 4 * c, stride, sk) if projection else nn.Identity()
        ops = [_simclr_conv(cin, c, 1), _simclr_bn(c)]
        if sk:
            ops.append(SimCLRSelectiveKernel(c, c, stride, dilation))
        else:
            ops += [_simclr_conv(c, c, 3, stride, dilation), _simclr_bn(c)]
        ops += [_simclr_conv(c, 4 * c, 1), _simclr_bn(4 * c, relu=False)]
        self.net = nn.Sequential(*ops)

    def forward(self, x):
        return F.relu(self.projection(x) + self.net(x))


class SimCLRStage(nn.Module):
    def __init__(self, n, cin, c, stride, sk, dilation=1, first_dilation=1):
        super().__init__()
        self.blocks = nn.ModuleList(
            [SimCLRBottleneck(cin, c, stride, sk, True, first_dilation)]
            + [SimCLRBottleneck(4 * c, c, 1, sk, False, dilation) for _ in range(n - 1)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


class SimCLRResNet(nn.Module):
    """A SimCLRv2 ResNet (depth 50/101/152, width 1 or 2, selective kernels on/off) whose
    state dict has exactly the keys and shapes of the converter's `resnet` entry.

    output_stride 16 replaces layer4's stride by dilation 2 the way torchvision's
    replace_stride_with_dilation does (the first block keeps dilation 1), so the same
    weights give the same features as the torchvision ResNet they map to
    (simclr_to_torchvision). forward(x): (B, 3, H, W) in [0, 1] -> layer4 (B, 2048 w, h, w)."""

    def __init__(self, depth=50, width=1, sk=False, output_stride=32):
        super().__init__()
        if depth not in SIMCLR_LAYERS or width not in (1, 2) or output_stride not in (16, 32):
            raise ValueError(f"SimCLRv2 ResNet: depth must be one of {list(SIMCLR_LAYERS)}, width 1 "
                             f"or 2, output stride 16 or 32; got {depth}, {width}, {output_stride}")
        self.depth, self.width, self.sk = depth, width, bool(sk)
        c = 64 * width
        if sk:  # three 3x3 convs instead of one 7x7 (the "ResNet-D"-like stem of SimCLRv2)
            stem = [_simclr_conv(3, c // 2, 3, 2), _simclr_bn(c // 2), _simclr_conv(c // 2, c // 2),
                    _simclr_bn(c // 2), _simclr_conv(c // 2, c)]
        else:
            stem = [_simclr_conv(3, c, 7, 2)]
        stem += [_simclr_bn(c), nn.MaxPool2d(3, 2, 1)]
        n = SIMCLR_LAYERS[depth]
        d4 = 2 if output_stride == 16 else 1
        stages, cin = [], c
        for i, (blocks, s) in enumerate(zip(n, (1, 2, 2, 2))):
            ci = 64 * width * 2 ** i
            if i == 3 and d4 == 2:
                stages.append(SimCLRStage(blocks, cin, ci, 1, sk, dilation=2, first_dilation=1))
            else:
                stages.append(SimCLRStage(blocks, cin, ci, s, sk))
            cin = 4 * ci
        self.net = nn.Sequential(nn.Sequential(*stem), *stages)
        self.channels = cin
        self.fc = nn.Linear(cin, 1000)

    def forward(self, x):  # x: (B, 3, H, W) in [0, 1]
        return self.net(x)


def simclr_name(depth, width, sk):
    return f"r{depth}_{width}x_sk{int(bool(sk))}"


def parse_simclr_name(name):
    """'simclr-r152-1x-sk1' or 'r152_1x_sk1' -> (152, 1, True); ValueError otherwise."""
    import re
    m = re.fullmatch(r"(?:simclr-)?r(\d+)[-_](\d)x[-_]sk([01])", str(name))
    if not m or int(m[1]) not in SIMCLR_LAYERS or int(m[2]) not in (1, 2):
        raise ValueError(f"{name!r} is not a SimCLRv2 ResNet name such as simclr-r152-1x-sk1 "
                         f"(depth {'/'.join(map(str, SIMCLR_LAYERS))}, width 1x or 2x, sk0 or sk1)")
    return int(m[1]), int(m[2]), m[3] == "1"


def guess_simclr_layout(state):
    """What a converter-layout state dict holds, from its keys and shapes: 'r152_1x_sk1',
    or None when it is not in that layout (used to say which file was given)."""
    try:
        stem = state["net.0.0.weight"]
        sk = "net.0.2.weight" in state
        width = stem.shape[0] * (2 if sk else 1) // 64
        n3 = len({k.split(".")[3] for k in state if k.startswith("net.3.blocks.")})
        depth = {6: 50, 23: 101, 36: 152}.get(n3)
        return simclr_name(depth, width, sk) if depth and width in (1, 2) else None
    except (KeyError, AttributeError, IndexError, TypeError):
        return None


def read_state_file(path, what):
    """torch.load a weights file (tensors only) with a clear error when missing/corrupt."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: weights file {p} not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DataError(f"{what}: {p} is not a PyTorch weights file ({type(e).__name__}: {e})") from None


def _state_report(own, state, what, optional=("num_batches_tracked",), allow_unused=False):
    """Compare a state dict with a module's: raise KeyError listing every missing,
    unexpected and mis-shaped key; return the unused keys when allow_unused."""
    def opt(k):
        return k.endswith(optional)
    missing = [k for k in own if k not in state and not opt(k)]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k}: expected {tuple(own[k].shape)}, found {tuple(v.shape)}"
             for k, v in state.items() if k in own and hasattr(v, "shape") and own[k].shape != v.shape]
    if missing or shape or (unexpected and not allow_unused):
        msg = [f"{what}: the state dict does not match"]
        for name, keys in (("missing keys", missing), ("unexpected keys", [] if allow_unused else unexpected),
                           ("shape mismatches", shape)):
            if keys:
                msg.append(f"  {name} ({len(keys)}): " + ", ".join(keys))
        raise KeyError("\n".join(msg))
    return unexpected


def load_simclr(net, path_or_state, what="SimCLRv2 weights"):
    """Load a converter file ({'resnet': ..., 'head': ...}) or its `resnet` dict into a
    SimCLRResNet, strictly: every missing, unexpected and mis-shaped key is listed, and the
    error says which SimCLRv2 network the file holds when it is another one."""
    state = read_state_file(path_or_state, what) if isinstance(path_or_state, (str, Path)) else path_or_state
    if not isinstance(state, dict):
        raise DataError(f"{what}: expected a dict, found {type(state).__name__}")
    if "resnet" in state and isinstance(state["resnet"], dict):
        state = state["resnet"]
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    want = simclr_name(net.depth, net.width, net.sk)
    try:
        _state_report(net.state_dict(), state, f"{what} (expected the converter layout of {want})")
    except KeyError as e:
        got = guess_simclr_layout(state)
        hint = (f"\n  the file holds {got}, not {want}" if got and got != want else
                "" if got else "\n  the file is not in the SimCLRv2 converter layout (keys net.0.0.weight, "
                               "net.1.blocks.0.net.0.weight, ...)")
        raise KeyError(e.args[0] + hint) from None
    net.load_state_dict(state, strict=False)  # strictness checked above (num_batches_tracked optional)
    return net


def build_simclr(name, weights="none", output_stride=32, what="--encoder-weights"):
    """A SimCLRResNet from its name ('simclr-r152-1x-sk1'); weights 'none' or a converter file."""
    depth, width, sk = parse_simclr_name(name)
    net = SimCLRResNet(depth, width, sk, output_stride)
    if weights not in ("none", None):
        if weights == "imagenet":
            raise ValueError(f"{what} imagenet: torchvision has no SimCLRv2 weights; pass the file "
                             f"written by the SimCLRv2 converter ({simclr_name(depth, width, sk)}.pth, "
                             f"see README.md) or none")
        load_simclr(net, weights, what=f"{what} {weights}")
    return net


def simclr_to_torchvision(state):
    """Rename a converter-layout sk0, width-1 state dict to torchvision's ResNet names.

    Returns (mapped, unused): mapped holds every backbone tensor under its torchvision name
    (conv1, bn1, layer1.0.conv1, ..., layer4.2.downsample.1.*), unused the keys that have
    no place in a backbone (fc.*). Any other key is an error: nothing is dropped silently.
    The two networks compute the same function: same convs (stride on the 3x3), same BN
    eps, same shortcut (conv1x1/stride + BN), same 7x7 stem and max pool."""
    if "resnet" in state and isinstance(state["resnet"], dict):
        state = state["resnet"]
    state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
    got = guess_simclr_layout(state)
    if got is None or not got.endswith("_1x_sk0"):
        raise KeyError(f"only a width-1, selective-kernel-free SimCLRv2 ResNet (r50_1x_sk0, r101_1x_sk0, "
                       f"r152_1x_sk0) maps onto a torchvision ResNet; the state dict holds "
                       f"{got or 'no SimCLRv2 converter layout'}")
    block = {"net.0": "conv1", "net.1.0": "bn1", "net.2": "conv2", "net.3.0": "bn2",
             "net.4": "conv3", "net.5.0": "bn3",
             "projection.shortcut": "downsample.0", "projection.bn.0": "downsample.1"}
    mapped, unused, bad = {}, [], []
    for k, v in state.items():
        parts = k.split(".")
        if parts[0] == "fc":
            unused.append(k)
        elif parts[:2] == ["net", "0"] and parts[2] in ("0", "1"):
            # stem: net.0.0 = conv1, net.0.1.0.* = bn1.*
            mapped[("conv1." if parts[2] == "0" else "bn1.") + parts[-1]] = v
        elif parts[0] == "net" and parts[1] in "1234" and parts[2] == "blocks":
            inner = ".".join(parts[4:-1])
            if inner in block:
                mapped[f"layer{parts[1]}.{parts[3]}.{block[inner]}.{parts[-1]}"] = v
            else:
                bad.append(k)
        else:
            bad.append(k)
    if bad:
        raise KeyError(f"{len(bad)} keys of the SimCLRv2 state dict have no torchvision name: {bad}")
    return mapped, unused


def load_backbone_init(backbone, name, spec, what="--student-init"):
    """Initialise a torchvision-layout ResNet `backbone` (DeepLabV3Plus.backbone, `name` =
    resnet101 ...) from `spec` and return a description for the manifest.

    spec: 'none' (keep the random init), 'imagenet' (torchvision's weights API), or a path:
      - a SimCLRv2 converter file ({'resnet': ..., 'head': ...}, r101_1x_sk0.pth): loaded
        strictly into a SimCLRResNet first (every converter key checked), then renamed
        one-to-one onto the backbone (simclr_to_torchvision);
      - a torchvision-layout state dict, bare or as {'state_dict': ...} / {'model': ...}
        (ProDA's and the official code's pretrained/r101_1x_sk0.pth; a torch.save of a
        torchvision ResNet's state_dict()).
    Every backbone tensor must be found with its shape, or a KeyError lists what is missing
    or mis-shaped; keys that have no place in the backbone (fc.*, the SimCLRv2 projection
    head) are listed once and recorded. The official code and ProDA load this file by name
    matching, which skips a key that does not match without a word (luyvlei/BiSMAPs
    models/adaptation_model.py l.87 and its adaptive_load_nets(); microsoft/ProDA
    models/deeplabv2.py Deeplab()). The student keeps ImageNet input normalisation, as the
    official distillation config does with this file (configs/gta5_dill.yml l.22-23)."""
    info = {"spec": str(spec)}
    if spec in ("none", None):
        info["layout"] = "random init"
        return info
    own = backbone.state_dict()
    if spec == "imagenet":
        ref = build_resnet(name, "imagenet", flag=what).state_dict()
        state = {k: v for k, v in ref.items() if k in own}
        info["layout"] = "torchvision ImageNet"
    else:
        raw = read_state_file(spec, what)
        if not isinstance(raw, dict):
            raise DataError(f"{what} {spec}: expected a state dict, found {type(raw).__name__}")
        unused = []
        if "resnet" in raw and isinstance(raw["resnet"], dict):  # the SimCLRv2 converter's file
            head = raw.get("head") or {}
            unused += [f"head.{k}" for k in head]
            raw = raw["resnet"]
        for key in ("state_dict", "model"):
            if key in raw and isinstance(raw[key], dict):
                unused += [k for k in raw if k != key]
                raw = raw[key]
        raw = {k[7:] if k.startswith("module.") else k: v for k, v in raw.items()}
        got = guess_simclr_layout(raw)
        if got is not None:
            depth = int(name.replace("resnet", "")) if name.replace("resnet", "").isdigit() else None
            if depth not in SIMCLR_LAYERS:
                raise KeyError(f"{what} {spec}: a SimCLRv2 file ({got}) cannot initialise a {name}")
            want = simclr_name(depth, 1, False)
            net = SimCLRResNet(depth, 1, False)
            load_simclr(net, raw, what=f"{what} {spec}")           # strict, converter layout
            state, fc = simclr_to_torchvision(net.state_dict())
            unused += fc
            info.update(layout=f"SimCLRv2 converter ({want})", simclr=want)
        else:
            state = raw
            info["layout"] = "torchvision names"
        unused += _state_report(own, state, f"{what} {spec} (expected every tensor of a torchvision "
                                f"{name} backbone)", allow_unused=True)
        if unused:
            short = sorted({u.rsplit(".", 1)[0] + ".*" for u in unused})
            log0(f"{what} {spec}: {len(unused)} keys not used by the {name} backbone: {', '.join(short)}")
        info["unused_keys"] = unused
    missing = [k for k in own if k not in state]   # only num_batches_tracked can be absent here
    backbone.load_state_dict({**own, **{k: v for k, v in state.items() if k in own}})
    info["tensors_loaded"] = len(own) - len(missing)
    info["tensors_in_backbone"] = len(own)
    return info


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al., ECCV 2018). forward(x) -> (features, logits):
    features (B, 256, H/4, W/4) are the decoder features the paper's MAPs use (E),
    logits (B, C, H/4, W/4) come from the 1x1 classifier (F); G = F o E (Eq. (1))."""

    def __init__(self, num_classes=NUM_CLASSES, backbone="resnet101", weights="none"):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP
        self.backbone = build_resnet(backbone, weights)
        self.backbone.fc = nn.Identity()
        high = 512 if backbone in ("resnet18", "resnet34") else 2048
        low = high // 8
        self.aspp = ASPP(high, [6, 12, 18], 256)
        # torchvision's ASPP ends in Dropout(0.5); the official BiSMAP ASPP has none
        # (luyvlei/BiSMAPs models/deeplabv3_plus.py, ASPP.forward): its only dropout is the
        # Dropout2d(0.1) before the classifier, which the EMA teacher switches off.
        self.aspp.project[3] = nn.Identity()
        self.low_proj = nn.Sequential(nn.Conv2d(low, 48, 1, bias=False), nn.BatchNorm2d(48),
                                      nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(0.1)  # as the official decoder.last_conv[-2]
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def forward(self, x):  # x: (B, 3, H, W) normalised
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        low = b.layer1(x)                                   # (B, low, H/4, W/4)
        high = b.layer4(b.layer3(b.layer2(low)))            # (B, high, H/16, W/16)
        a = self.aspp(high)                                 # (B, 256, H/16, W/16)
        a = F.interpolate(a, size=low.shape[-2:], mode="bilinear", align_corners=False)
        feat = self.decoder(torch.cat([a, self.low_proj(low)], 1))  # (B, 256, H/4, W/4)
        return feat, self.classifier(self.dropout(feat))

    def head_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.")]

    def backbone_parameters(self):
        return [p for n, p in self.named_parameters() if n.startswith("backbone.")]


def build_model(backbone, weights="none", num_classes=NUM_CLASSES):
    return DeepLabV3Plus(num_classes, backbone, weights)


def model_from_checkpoint(path, device="cpu", producer=None):
    """Rebuild the segmentor saved in a stage's model.pt (strict load)."""
    ckpt = load_checkpoint(path, producer)
    a = ckpt["args"]
    model = build_model(a["backbone"], "none")
    load_state_strict(model, ckpt["model"], what=str(path))
    return model.to(device).eval(), ckpt


@torch.no_grad()
def predict_logits(model, img_u8, flip=False, size=None):
    """Logits at the input size (or `size`), optionally averaged over a horizontal flip.
    img_u8: (B, 3, H, W) uint8 on the model's device. Returns (B, C, H, W) float32."""
    x = normalize(img_u8)
    size = size or x.shape[-2:]
    out = F.interpolate(model(x)[1].float(), size=size, mode="bilinear", align_corners=False)
    if flip:
        o2 = F.interpolate(model(x.flip(-1))[1].float(), size=size, mode="bilinear",
                           align_corners=False)
        out = (out.softmax(1) + o2.flip(-1).softmax(1)).log() - math.log(2)
    return out


# ============================================================================
# Metrics: confusion matrix, per-class IoU, the paper's table layout
# ============================================================================
def confusion(pred, label, n=NUM_CLASSES):
    """(n, n + 1) int64 confusion: rows = ground truth, columns = prediction, and a last
    column for predictions outside 0..n-1 (e.g. 255 in a prediction file: a miss).
    Ground-truth pixels labelled 255 (or >= n) are ignored."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    label = np.asarray(label).ravel().astype(np.int64)
    m = label < n
    pred = np.where(pred < n, pred, n)[m]
    return np.bincount(label[m] * (n + 1) + pred, minlength=n * (n + 1)).reshape(n, n + 1)


def iou_per_class(cm):
    """IoU_c = TP / (TP + FP + FN); NaN where a class never occurs nor is predicted.
    Accepts an (n, n) or (n, n+1) confusion (last column: 'no class' predictions)."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.shape[0]
    tp = np.diag(cm[:, :n])
    gt = cm.sum(1)
    pr = cm[:, :n].sum(0)
    denom = gt + pr - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / denom, np.nan)


def miou(iou, classes):
    vals = [iou[c] for c in classes if not np.isnan(iou[c])]
    return float(np.mean(vals)) if vals else float("nan")


def summarize_iou(cm, source):
    """{'miou': headline mIoU (%), 'miou16'/'miou13'/..., 'iou': per-class (%) dict}."""
    iou = iou_per_class(cm)
    sets = SOURCE_EVAL_SETS[source]
    out = {"miou": 100 * miou(iou, EVAL_CLASSES[sets[0]])}
    for s in sets:
        out[f"miou{s}"] = 100 * miou(iou, EVAL_CLASSES[s])
    out["iou"] = {CLASSES[c]: (None if np.isnan(iou[c]) else round(100 * float(iou[c]), 2))
                  for c in EVAL_CLASSES[sets[0]]}
    return out


SHORT = ("road", "side.", "buil.", "wall", "fence", "pole", "light", "sign", "vege.",
         "terr.", "sky", "pers.", "rider", "car", "truck", "bus", "train", "motor", "bike")


def iou_table(cm, source, title=""):
    """The per-class IoU table laid out like the paper's Table 1 (GTA5) / Table 2 (SYNTHIA)."""
    iou = iou_per_class(cm)
    sets = SOURCE_EVAL_SETS[source]
    cls = EVAL_CLASSES[sets[0]]
    head = [SHORT[c] for c in cls] + [f"mIoU{s}" if len(sets) > 1 else "mIoU" for s in sets]
    vals = ["  -  " if np.isnan(iou[c]) else f"{100 * iou[c]:5.1f}" for c in cls]
    vals += [f"{100 * miou(iou, EVAL_CLASSES[s]):5.1f}" for s in sets]
    w = [max(len(h), len(v)) for h, v in zip(head, vals)]
    lines = [title] if title else []
    lines.append(" ".join(h.rjust(x) for h, x in zip(head, w)))
    lines.append(" ".join(v.rjust(x) for v, x in zip(vals, w)))
    return "\n".join(lines)


def target_ground_truth(data):
    """{image name: gtFine label path} for Cityscapes train, {} where there is none (the
    target training labels serve the pseudo-label reports only, never training)."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {item_name(i): lab for i, lab in cityscapes_items(data, "train", with_labels=True)}
    except DataError:
        return {}


class LabelTally:
    """Pseudo labels counted against the target ground truth where it exists (03's and
    06's reports): pixels, labelled pixels, pseudo-label pixels per class, and two
    (C, C + 1) confusions (rows ground truth): every pixel (a 255 is a miss) and labelled
    pixels only."""

    def __init__(self, n=NUM_CLASSES):
        self.n = n
        self.cm_all = np.zeros((n, n + 1), np.int64)
        self.cm_lab = np.zeros((n, n + 1), np.int64)
        self.stats = np.zeros(3, np.int64)   # pixels, labelled pixels, images with ground truth
        self.per_class = np.zeros(n, np.int64)

    def add(self, pl, gt_path):
        """Count one image's pseudo labels (H, W); returns its ground truth (or None)."""
        self.stats[0] += pl.size
        self.stats[1] += int((pl != IGNORE).sum())
        self.per_class += np.bincount(pl.ravel(), minlength=256)[:self.n]
        if gt_path is None:
            return None
        # The target ground truth only feeds this report, never training: a label that
        # cannot be used is left out of the report with a warning naming it, rather than
        # stopping a stage that may have run for hours.
        try:
            gt = decode_label(gt_path, "cityscapes")
            if gt.shape != pl.shape:
                raise DataError(f"{gt_path}: ground truth is {gt.shape[1]}x{gt.shape[0]} but the "
                                f"image is {pl.shape[1]}x{pl.shape[0]}")
        except DataError as e:
            warn(f"{e} (left out of the pseudo-label report; it is not used for training)")
            return None
        self.stats[2] += 1
        self.cm_all += confusion(pl, gt, self.n)
        m = pl != IGNORE
        self.cm_lab += confusion(pl[m], gt[m], self.n)
        return gt

    def all_reduce(self, device):
        """Sum the counts over all ranks (under torchrun)."""
        if get_world() == 1:
            return
        n, k = self.n, self.n * (self.n + 1)
        red = torch.from_numpy(np.concatenate([self.cm_all.ravel(), self.cm_lab.ravel(),
                                               self.stats, self.per_class])).to(device)
        dist.all_reduce(red)
        red = red.cpu().numpy()
        self.cm_all, self.cm_lab = red[:k].reshape(n, n + 1), red[k:2 * k].reshape(n, n + 1)
        self.stats, self.per_class = red[2 * k:2 * k + 3], red[2 * k + 3:]

    @classmethod
    def of_folder(cls, items, label_dir, gt_for):
        """The tally of a folder of pseudo labels (one <item name>.png per target item);
        gt_for: {item name: ground-truth path} (target_ground_truth)."""
        t = cls()
        for p, _ in items:
            t.add(decode_label(Path(label_dir) / item_name(p), "trainid"), gt_for.get(item_name(p)))
        return t

    def summary(self, source):
        """pl_ratio; with ground truth also accuracy (labelled pixels), mIoU (a miss counts
        against its class), mIoU of the labelled pixels, and `unlabelled_classes`: the
        classes of the ground truth none of whose pixels got their own label (self-training
        gets no target signal for them; e.g. a global threshold that only the confident
        classes pass)."""
        return self._figures(source)[0]

    def report(self, source):
        """summary() plus per class: pseudo-label pixels, IoU (all pixels / labelled ones),
        `labelled_share` (% of the class's ground-truth pixels that got its own label, the
        class's recall) and the confusion."""
        s, per_class = self._figures(source)
        return {**s, **per_class}

    def _figures(self, source):
        n = self.n
        s = {"pl_ratio": round(float(self.stats[1] / max(1, self.stats[0])), 4)}
        r = {"pseudo_pixels_per_class": {CLASSES[c]: int(self.per_class[c]) for c in range(n)}}
        if self.stats[2]:
            s_all, s_lab = summarize_iou(self.cm_all, source), summarize_iou(self.cm_lab, source)
            cls = EVAL_CLASSES[SOURCE_EVAL_SETS[source][0]]
            gt = self.cm_all.sum(1)
            s["accuracy"] = round(float(np.trace(self.cm_lab[:, :n]) / max(1, self.cm_lab[:, :n].sum())), 4)
            s["miou"] = round(s_all["miou"], 2)
            s["miou_labelled"] = round(s_lab["miou"], 2)
            s["images_with_ground_truth"] = int(self.stats[2])
            s["unlabelled_classes"] = [CLASSES[c] for c in cls if gt[c] > 0 and self.cm_all[c, c] == 0]
            r["iou"], r["iou_labelled"] = s_all["iou"], s_lab["iou"]
            r["labelled_share"] = {CLASSES[c]: (round(100 * float(self.cm_all[c, c] / gt[c]), 2) if gt[c] else None)
                                   for c in cls}
            r["confusion"] = self.cm_all.tolist()
        return s, r

    def log(self, source, what):
        """The two IoU tables and the share of each class's pixels labelled, on rank 0."""
        if not self.stats[2]:
            return
        log0(iou_table(self.cm_lab, source, f"per-class IoU of {what}, labelled pixels only"))
        log0(iou_table(self.cm_all, source, f"per-class IoU of {what}, ignored pixels counted as misses"))
        r = self.report(source)
        log0(f"share of each class's ground-truth pixels that {what} label correctly (%): "
             + ", ".join(f"{k} {v:.1f}" for k, v in r["labelled_share"].items() if v is not None))
        if r["unlabelled_classes"]:
            log0(f"warning: {what} give no correct label to any pixel of: {', '.join(r['unlabelled_classes'])} "
                 f"(self-training sees no target example of these classes)")


@torch.no_grad()
def evaluate(model, items, label_kind, device, source, flip=False, desc="eval", rank=0, world=1,
             image_for=None):
    """Full-resolution evaluation (the field's protocol: Cityscapes val at 2048x1024).
    Images are sharded across ranks and the confusion matrices summed."""
    from tqdm import tqdm
    was_training = model.training
    model.eval()
    n = NUM_CLASSES
    cm = torch.zeros(n, n + 1, dtype=torch.int64)
    mine = items[rank::world]
    for img_path, lab_path in tqdm(mine, desc=desc, leave=False, disable=rank != 0 or len(mine) < 20):
        img = image_tensor(image_for(img_path) if image_for else img_path, device)
        lab = decode_label(lab_path, label_kind)
        pred = predict_logits(model, img, flip=flip, size=lab.shape).argmax(1)[0].cpu().numpy()
        cm += torch.from_numpy(confusion(pred, lab, n))
    if world > 1:
        cm = cm.to(device)
        dist.all_reduce(cm)
        cm = cm.cpu()
    model.train(was_training)
    return cm.numpy()


# ============================================================================
# Stage folders, manifests, checkpoints
# ============================================================================
STAGES = {
    "01_stylize": "01_stylize.py", "02_warmup": "02_warmup.py", "03_maps": "03_maps.py",
    "04_stm": "04_stm.py", "05_selftrain": "05_selftrain.py", "06_distill": "06_distill.py",
    "export": "export_onnx.py",
}


class StageError(RuntimeError):
    """An earlier stage's output is missing or stale."""


def stage_dir(work, stage):
    return Path(work) / stage


def need(path, stage, what="", hint=""):
    """Fail with a message naming the file and the script that makes it."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found{' (' + what + ')' if what else ''}: "
                         f"run {STAGES[stage]} first{hint}")
    return path


def read_manifest(work, stage):
    """The manifest of a finished stage; a missing or incomplete one is a clear error."""
    p = need(stage_dir(work, stage) / "manifest.json", stage, "the stage has not finished")
    m = json.loads(p.read_text())
    if not m.get("complete"):
        raise StageError(f"{p}: the stage did not finish: run {STAGES[stage]} again")
    return m


def file_record(path):
    p = Path(path)
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime": st.st_mtime}


def code_revision():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
        rev = out.stdout.strip()
        if rev:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, cwd=Path(__file__).parent,
                                   timeout=5).stdout.strip()
            return rev + ("-dirty" if dirty else "")
    except Exception:
        pass
    return None


def environment(device=None):
    """What a run's figures depend on besides its arguments and data (README,
    "Reproducibility"): library versions, the CPU, the instruction set torch's CPU kernels
    were dispatched to, the thread count, and the GPU when the run used one (device: the
    stage's --device, None = pick_device's default). The same seed on another CPU kind or
    thread count trains to other weights."""
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(dev) if (dev := pick_device(device)).type == "cuda" else None}


def items_digest(items):
    """A short fingerprint of an ordered list of files (their names), to detect stale inputs."""
    h = hashlib.sha1()
    for it in items:
        p = it[0] if isinstance(it, (tuple, list)) else it
        h.update(Path(p).name.encode() + b"\n")
    return h.hexdigest()[:16]


class Stage:
    """One stage run: its folder, its arguments, its inputs, and its manifest.

    begin(): removes a previous manifest (so a crash never leaves a 'complete' stage)
    and records run.json; a stage whose run.json holds the same resume key resumes
    (per-image outputs already written are kept, and so is the run id that later stages
    record, so that rerunning a finished stage leaves them valid; under torchrun every rank
    follows rank 0's decision). Otherwise a finished run (other arguments or upstream runs) is moved
    aside to <stage>.previous; an unfinished one that has written anything stops the stage
    (keep_unfinished_run) unless --resume never; and the folder starts empty.
    finish(summary): writes manifest.json (complete=True) atomically, then deletes
    <stage>.previous: finished work is removed only once the run replacing it has finished."""

    def __init__(self, args, name):
        self.args, self.name = args, name
        self.dir = stage_dir(args.work, name)
        self.inputs, self.upstream = [], {}
        self.t0 = time.time()
        self.rank = get_rank()
        self.run_id = None   # set by begin() on rank 0 (finish() is rank 0's): kept on resume
        self.earlier = {}    # a resumed finished run's manifest: its time and first finish carry over

    def resume_key(self):
        skip = {"device", "workers", "eval_every", "log_every", "resume", "debug", "check_images"}
        return {k: v for k, v in sorted(vars(self.args).items()) if k not in skip}

    def run_key(self):
        """What run.json records and a resume must match: the arguments (resume_key) and
        the run ids of the upstream stages read with use()."""
        key = json.loads(json.dumps(self.resume_key(), default=_json_default))
        key["upstream"] = self.upstream_ids()
        return key

    def finished_unchanged(self):
        """This folder's manifest if it records a finished run that had this run's key (the
        same arguments and upstream runs) and --resume is auto, else None. Call it after
        use() and before begin(), which removes the manifest. For a stage that can skip its
        work outright when nothing changed (the export)."""
        if getattr(self.args, "resume", "auto") != "auto":
            return None
        m = self.finished_manifest()
        try:
            old = json.loads((self.dir / "run.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return m if m is not None and isinstance(old, dict) and old.get("key") == self.run_key() else None

    def begin(self, check=()):
        """Start (or resume) the stage. Returns True when resuming a matching run.

        Validate first, clear late: every check that can fail on the user's input (flags,
        upstream stages, data; with `check`, a decode of every file of those datasets,
        see check_readable) runs before this clears the folder of a finished run."""
        if check and getattr(self.args, "check_images", True):
            check_readable(check, getattr(self.args, "workers", 0), self.rank, get_world())
        run = self.dir / "run.json"
        key = self.run_key()
        resuming, error = False, None
        if self.rank == 0:
            try:
                resuming = self._begin_on_rank0(run, key)
            except (StageError, WriteError) as e:
                error = e
        if get_world() > 1:  # every rank resumes (or stops) as rank 0 decided
            shared = [resuming, None if error is None else str(error)]
            dist.broadcast_object_list(shared, src=0)
            resuming = shared[0]
            if shared[1] is not None and error is None:
                error = StageError(shared[1])
        if error is not None:
            raise error
        barrier()
        return resuming

    def _begin_on_rank0(self, run, key):
        try:
            old = json.loads(run.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        old = old if isinstance(old, dict) else {}
        old_key, run_id = old.get("key"), old.get("run_id")
        auto = getattr(self.args, "resume", "auto") == "auto"
        resuming = auto and old_key == key
        if resuming and run_id is None:  # a run.json written before run ids were kept in it
            run_id = (self.finished_manifest() or {}).get("run_id")
        # The run id names what the stage writes, which the later stages record (upstream).
        # Resuming continues the same run, so it keeps its id: rerunning a finished stage with
        # the same arguments (to finish the pipeline after an interruption, say) must not
        # make every later stage stale and start again from scratch.
        self.run_id = run_id if resuming and run_id else uuid.uuid4().hex
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.dir, e) from None
        if not resuming:
            if auto:
                self.keep_unfinished_run(run, old_key, key)
            self.set_aside_finished_run()
            if self.dir.is_symlink():  # an unfinished run in a shared folder: drop the link only
                self.dir.unlink()
                self.dir.mkdir()
            for p in self.dir.iterdir():
                remove_tree(p)
        # resuming a finished run: its work time and first finish stay in the new manifest
        self.earlier = (self.finished_manifest() or {}) if resuming else {}
        (self.dir / "manifest.json").unlink(missing_ok=True)
        for p in self.dir.rglob(".tmp-*"):
            p.unlink()
        save_json(run, {"key": key, "started": now(), "run_id": self.run_id})
        return resuming

    def holds_finished_run(self):
        return self.finished_manifest() is not None

    def finished_manifest(self):
        """This folder's manifest if it records a finished run, else None."""
        try:
            m = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return m if isinstance(m, dict) and m.get("complete") else None

    def keep_unfinished_run(self, run, old_key, key):
        """An unfinished run that has written anything (a training checkpoint, last.pt, or
        per-image outputs: 01's stylized images, 03's pseudo labels, 04's maps) is not
        deleted by a run with other arguments or inputs: that could be hours or days of
        work lost to a typo. Stop instead, naming what differs; --resume never discards it
        on purpose. (A finished run is set aside instead, set_aside_finished_run; a linked
        folder only loses its link, never the files it points to.)"""
        if self.dir.is_symlink() or self.holds_finished_run():
            return
        written = sorted(p for p in self.dir.rglob("*") if p.is_file() and p != run
                         and not p.name.startswith(".tmp-"))
        if not written:
            return
        checkpoints = [p for p in written if p.name == "last.pt"]
        what = (f"a training checkpoint ({checkpoints[-1]})" if checkpoints
                else f"{len(written)} file(s) written, e.g. {written[0]}")
        diff = (key_changes(old_key, key) if isinstance(old_key, dict)
                else [f"its {run.name} is missing or unreadable"])
        raise StageError(
            f"{self.dir} holds an unfinished run with {what} and other arguments or inputs: "
            + ("; ".join(diff) if diff else "unknown")
            + ". It is not deleted: rerun with its arguments to continue it, or add --resume never "
              "to discard it and start this run.")

    def upstream_ids(self):
        return {k: v.get("run_id") for k, v in self.upstream.items()}

    @property
    def previous(self):
        return self.dir.with_name(self.dir.name + ".previous")

    def set_aside_finished_run(self):
        """Rename a finished run's folder to <stage>.previous (a rename: no copy, no extra
        disk until the new run writes) and start an empty folder. A folder that is a link
        (a stage shared with another work folder) is renamed as a link: what it points to is
        never touched. An older <stage>.previous is replaced by this newer finished run."""
        global _SET_ASIDE
        if not self.holds_finished_run():
            return
        try:
            remove_tree(self.previous)
            os.replace(self.dir, self.previous)
            self.dir.mkdir()
        except OSError as e:
            raise write_error(self.previous, e) from None
        _SET_ASIDE = (self.dir, self.previous)
        log0(f"{self.dir}: the finished run there had other arguments or inputs; it is kept in "
             f"{self.previous} until this run finishes")

    def use(self, stage):
        """Read an upstream stage's manifest and remember its run id."""
        m = read_manifest(self.args.work, stage)
        self.upstream[stage] = m
        return m

    def add_input(self, path):
        self.inputs.append(file_record(path))

    def finish(self, summary, **extra):
        if self.rank != 0:
            return None
        t = now()
        m = {"stage": self.name, "complete": True, "run_id": self.run_id,
             "args": vars(self.args), "inputs": self.inputs,
             "upstream": {k: v.get("run_id") for k, v in self.upstream.items()},
             "code_revision": code_revision(), "finished": t,
             # the environment that made the figures: a resumed finished run keeps its own
             "environment": self.earlier.get("environment") or environment(getattr(self.args, "device", None)),
             "first_finished": self.earlier.get("first_finished", self.earlier.get("finished", t)),
             # seconds of every invocation of this run that reached the end (a resumed finished
             # run adds its resume to the time of the work; an interrupted invocation is not counted)
             "wall_time_s": round(float(self.earlier.get("wall_time_s", 0)) + time.time() - self.t0, 1),
             "summary": summary}
        m.update(extra)
        save_json(self.dir / "manifest.json", m)
        remove_tree(self.previous)                 # the run it replaces, now that this one is done
        return m


def key_changes(old, new):
    """What differs between two run keys (run.json), as flags and upstream stages."""
    out = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) == new.get(k):
            continue
        if k == "upstream":
            a, b = old.get(k) or {}, new.get(k) or {}
            out.append(f"the runs of {', '.join(sorted(s for s in set(a) | set(b) if a.get(s) != b.get(s)))} "
                       f"it was made from")
        else:
            out.append(f"--{k.replace('_', '-')} {old.get(k)!r} (now {new.get(k)!r})")
    return out


_SET_ASIDE = None   # (stage folder, where its finished run was moved) for run_main's error note


def remove_tree(path):
    """Delete a folder (or, for a link, only the link); nothing there is not an error."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def start(args, name):
    """The opening of a training stage: join torchrun if it launched us, pick the device,
    seed (per rank) and open the stage folder. Returns (stage, device, rank, world)."""
    rank, world = setup_distributed(args.device)
    device = pick_device(args.device)
    seed_everything(args.seed + rank)
    return Stage(args, name), device, rank, world


def now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def save_checkpoint(path, **state):
    """torch.save `state` to `path` atomically. torch's zip writer reports a failed write
    (a full disk, a file-size limit) as a RuntimeError such as "unexpected pos ... vs ...",
    not as an OSError: it becomes a WriteError naming `path` and the likely cause."""
    with atomic_write(path) as tmp:
        try:
            torch.save(state, tmp)
        except RuntimeError as e:
            free = shutil.disk_usage(tmp.parent).free
            errno = 28 if free < DISK_NEARLY_FULL else 5     # ENOSPC, else EIO
            raise write_error(path, OSError(errno, f"torch.save failed ({e}); "
                                                   f"{free / 2**20:.0f} MiB free on that disk")) from None


def load_checkpoint(path, producer=None):
    """torch.load a checkpoint dict, with a clear error when it is missing or corrupt."""
    p = Path(path)
    if not p.exists():
        if producer:
            raise StageError(f"{p} not found: run {STAGES[producer]} first")
        raise FileNotFoundError(f"{p} not found")
    try:
        return torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from None


# ============================================================================
# Seeding, devices, mixed precision, distributed
# ============================================================================
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name=None):
    """--device as a torch.device: the flag's value, else CUDA when present, else the CPU.
    Under torchrun a plain 'cuda' (or no flag on a CUDA machine) is the GPU of the
    process's LOCAL_RANK, the one setup_distributed selected."""
    want = torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if want.type == "cuda" and want.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return want


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def get_world():
    return dist.get_world_size() if dist.is_initialized() else 1


def setup_distributed(device=None):
    """Join the torchrun process group when launched by torchrun: NCCL when the processes
    run on GPUs (--device cuda, or no --device on a CUDA machine), each on the GPU of its
    LOCAL_RANK; gloo when they run on the CPU (--device cpu, or no CUDA). check_flags has
    already refused more processes per node than GPUs."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        on_gpu = pick_device(device).type == "cuda"
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return get_rank(), get_world()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup_distributed():
    """Leave the torchrun process group. Every rank first waits for the others (rank 0 may
    still be writing previews and the manifest), so that no rank closes its connections
    while a peer is still working: in one 2-process CI run, 04_stm's rank 1, leaving
    while rank 0 wrote its previews, aborted ("terminate called without an active
    exception", SIGABRT) and torchrun then stopped rank 0."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def autocast(device, enabled):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def log0(*a, **k):
    if get_rank() == 0:
        print(*a, **k, flush=True)


# ============================================================================
# Command line: one contract for every stage (DESIGN.md)
# ============================================================================
def _at_least(n):
    return lambda v: v >= n, f"an integer >= {n}" if n else "a number >= 0"


def _weights_flag(v):
    return v in ("imagenet", "none", None) or Path(v).is_file()


# What each flag accepts, by argparse dest, for every stage (StageParser checks them all
# before a stage touches its folder). A flag missing here is not range-checked.
FLAG_RULES = {
    "seed": _at_least(0), "workers": _at_least(0),
    "iters": _at_least(1), "batch_size": _at_least(1), "eval_every": _at_least(1),
    "save_every": _at_least(1), "log_every": _at_least(1), "warmup_iters": _at_least(0),
    "lr": (lambda v: v > 0, "a number > 0"), "head_lr_mult": (lambda v: v > 0, "a number > 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"), "weight_decay": _at_least(0),
    "power": _at_least(0), "jitter": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "scale": (lambda v: 0 < v[0] <= v[1], "two numbers 0 < MIN <= MAX"),
    # below the output stride (16) a crop has a single feature position at the encoder output
    "crop": (lambda v: min(v) >= 16, "W H, each at least 16 pixels (the model's output stride)"),
    "source_eval": _at_least(0), "previews": _at_least(0), "gamma_reg": _at_least(0),
    "weights": (_weights_flag, "imagenet, none or an existing state-dict file"),
    "student_init": (lambda v: v in ("warmup", "warmup-full", "teacher") or _weights_flag(v),
                     "imagenet, none, warmup, warmup-full, teacher or an existing state-dict file"),
    "encoder_weights": (_weights_flag, "imagenet, none or an existing state-dict file"),
    # 03
    "target_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "distance_threshold": (lambda v: v > 0, "a number > 0"),
    "components": _at_least(1), "samples_per_class": _at_least(1), "min_per_component": _at_least(1),
    "reg_covar": _at_least(0), "tol": (lambda v: v > 0, "a number > 0"), "max_iter": _at_least(1),
    "calib_images": _at_least(1), "calib_pixels": _at_least(1), "chunk": _at_least(1),
    # 04
    "clusters": _at_least(1), "samples": _at_least(1),
    "encoder_scale": (lambda v: v > 0, "a number > 0"),
    # 05, 06
    "alpha": _at_least(0), "beta": _at_least(0), "lam": _at_least(0),
    "ema": (lambda v: 0 <= v <= 1, "in [0, 1]"), "ramp_up": _at_least(0), "ra_ops": _at_least(0),
    "ra_magnitude": (lambda v: 2 <= v <= 10, "in 2 ... 10"), "cutout": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "rounds": _at_least(1), "kd_weight": _at_least(0),
    "conf_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "bn_images": _at_least(0),
    "scales": (lambda v: all(x > 0 for x in v), "numbers > 0"),
    # export
    "val_images": _at_least(1),
}


def check_flags(args):
    """The flags of `args` that FLAG_RULES refuses, each as 'what was expected, what was
    found', plus the checks that need several flags (BatchNorm batch, device)."""
    bad = []
    for k, v in vars(args).items():
        if k in FLAG_RULES and v is not None:
            ok, want = FLAG_RULES[k]
            try:
                good = ok(v)
            except (TypeError, ValueError, IndexError):
                good = False
            if not good:
                shown = " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
                bad.append(f"--{k.replace('_', '-')} must be {want}, got {shown}")
    dev = getattr(args, "device", None)
    if dev:
        try:
            d = torch.device(dev)
        except (RuntimeError, ValueError):
            bad.append(f"--device must be cpu, cuda or cuda:N, got {dev}")
        else:
            if d.type == "cuda" and not torch.cuda.is_available():
                bad.append(f"--device {dev}: CUDA is not available on this machine (use --device cpu)")
            elif d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
                bad.append(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if "WORLD_SIZE" in os.environ and not bad:
        # under torchrun every process takes the GPU of its LOCAL_RANK (setup_distributed)
        local, n = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if pick_device(dev).type == "cuda" and local >= n:
            bad.append(f"torchrun started local rank {local} but this machine has {n} CUDA device(s): "
                       f"run one process per GPU (--nproc_per_node {n}), or add --device cpu "
                       f"to run the processes on the CPU (gloo)")
    if getattr(args, "batch_size", None) is not None and args.batch_size >= 1:
        # train-mode BatchNorm (the image-pooling branch of ASPP sees one value per image)
        # needs two images per normalisation group: per process, or across processes when
        # SyncBatchNorm joins them (CUDA under torchrun, see wrap_ddp)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cuda = (dev or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        if args.batch_size * (world if cuda else 1) < 2:
            bad.append(f"--batch-size {args.batch_size} gives BatchNorm one image per group: "
                       f"use --batch-size 2 or more" + (" (SyncBatchNorm joins processes on CUDA "
                                                        "only)" if world > 1 else ""))
    return bad


class StageParser(argparse.ArgumentParser):
    """argparse with the checks of FLAG_RULES after parsing, and one-line errors: a bad
    flag stops the stage before it reads or removes anything (exit status 2)."""

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        bad = check_flags(ns)
        if bad:
            self.error("; ".join(bad))
        return ns

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists every flag and "
                     f"what it accepts; nothing was changed)\n")


def base_parser(doc, training=False):
    p = StageParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("common")
    g.add_argument("--data", default="data", help="folder holding GTA5/, SYNTHIA/RAND_CITYSCAPES/, cityscapes/")
    g.add_argument("--work", default="work", help="folder holding the stage folders 01_stylize/ ... export/")
    g.add_argument("--source", default="gta5", choices=["gta5", "synthia"], help="source domain")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--workers", type=int, default=4, help="data-loading processes")
    g.add_argument("--resume", default="auto", choices=["auto", "never"],
                   help="auto: continue an interrupted run of this stage with the same arguments "
                        "(an interrupted run with other arguments is not deleted: the stage "
                        "stops and says what differs); never: start afresh, discarding an "
                        "interrupted run (a finished one is still kept until this one finishes)")
    g.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an expected error (bad input, stale stage)")
    if training:
        t = p.add_argument_group("training (Sec. 4.2)")
        t.add_argument("--iters", type=int, default=90000, help="iterations (paper: 90,000)")
        t.add_argument("--batch-size", type=int, default=8, help="images per step per process")
        t.add_argument("--crop", type=int, nargs=2, default=[896, 512], metavar=("W", "H"),
                       help="random crop (paper: 896 512)")
        t.add_argument("--scale", type=float, nargs=2, default=[0.5, 1.5], help="random scale range (paper: 0.5 1.5)")
        t.add_argument("--base-resize", default="official", choices=["official", "native"],
                       help="size before the random scale. official: GTA5 1914x1052 -> 2200x1209 "
                            "(the official loader scales relative to 2200 px wide), SYNTHIA "
                            "1280x760 -> 2048x1024 (Sec. 4.2), Cityscapes kept at 2048x1024 (as "
                            "factors of the native size, so toy data scale alike); native: none")
        t.add_argument("--jitter", type=float, default=0.25, help="colour jitter strength (brightness/contrast/saturation)")
        t.add_argument("--lr", type=float, default=5e-4, help="SGD learning rate (paper: 5e-4), head x10")
        t.add_argument("--head-lr-mult", type=float, default=10.0, help="lr multiplier of the head")
        t.add_argument("--momentum", type=float, default=0.9)
        t.add_argument("--weight-decay", type=float, default=5e-4)
        t.add_argument("--power", type=float, default=0.9, help="poly learning-rate power")
        t.add_argument("--warmup-iters", type=int, default=0,
                       help="linear lr warm-up iterations at the start of the schedule")
        t.add_argument("--eval-every", type=int, default=2000, help="evaluate on target val every N iterations")
        t.add_argument("--save-every", type=int, default=1000, help="write last.pt every N iterations")
        t.add_argument("--log-every", type=int, default=50)
        t.add_argument("--eval-flip", action="store_true", help="average predictions over a horizontal flip")
        t.add_argument("--check-images", default=True, action=argparse.BooleanOptionalAction,
                       help="decode every image and label the stage will read before the first "
                            "iteration, and list all unreadable ones at once")
        t.add_argument("--amp", default=True, action=argparse.BooleanOptionalAction,
                       help="mixed precision on CUDA (ignored on CPU)")
        t.add_argument("--backbone", default="resnet101", choices=BACKBONES,
                       help="paper: resnet101; resnet18/50 for small runs")
    return p


# ============================================================================
# Shared losses
# ============================================================================
def weighted_ce(logits, label, weight=None):
    """Eq. (10): sum_i -w_i log p_{i,y_i} / (number of labelled pixels).

    logits (B, C, H, W); label (B, H, W) with 255 ignored; weight (B, H, W) in [0, 1]
    or None (uniform 1, i.e. Eq. (2))."""
    ce = F.cross_entropy(logits.float(), label.long(), ignore_index=IGNORE, reduction="none")  # (B, H, W)
    valid = label != IGNORE
    if weight is not None:
        ce = ce * weight  # Eq. (10)
    return ce[valid].sum() / valid.sum().clamp(min=1)


def symmetric_ce(logits, label, alpha=0.1, beta=1.0, clamp=1e-4):
    """Eq. (11): alpha * CE + beta * RCE, RCE = -sum_c p_c log y_c with the one-hot label
    clamped to [clamp, 1]; averaged over labelled pixels (255 contributes nothing)."""
    logits = logits.float()
    valid = label != IGNORE
    n = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits, label.long(), ignore_index=IGNORE, reduction="sum") / n
    p = logits.softmax(1)                                         # (B, C, H, W)
    onehot = F.one_hot(label.long().clamp(max=logits.shape[1] - 1), logits.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float().clamp(min=clamp, max=1.0)
    rce = -(p * onehot.log()).sum(1)                              # (B, H, W)
    rce = rce[valid].sum() / n
    return alpha * ce + beta * rce  # Eq. (11)


# ============================================================================
# The shared training loop (02, 05, 06): SGD, poly lr, AMP, DDP, eval, resume
# ============================================================================
def poly_lr(base, it, total, power=0.9, warmup=0):
    """Poly schedule lr = base * (1 - it/total)^power, after an optional linear warm-up."""
    if warmup and it < warmup:
        return base * (it + 1) / warmup
    return base * (1 - it / max(1, total)) ** power


def make_optimizer(model, args):
    """SGD, momentum 0.9, weight decay 5e-4; the head learns 10x faster (Sec. 4.2)."""
    return torch.optim.SGD([
        {"params": model.backbone_parameters(), "lr": args.lr, "lr_mult": 1.0},
        {"params": model.head_parameters(), "lr": args.lr * args.head_lr_mult,
         "lr_mult": args.head_lr_mult}],
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def official_fraction(iters, official, of=90000):
    """`official` iterations of the official 90,000-iteration schedule, scaled to a
    schedule of `iters` (so the real run gets exactly the official value and a short
    run the same fraction of its schedule); at least 1 for a positive value."""
    return max(1, round(official * iters / of)) if official > 0 else 0


class NonFiniteLoss(RuntimeError):
    pass


def train_loop(args, out_dir, model, step_loss, eval_items, eval_kind="cityscapes",
               extra_state=None, after_step=None, resume=False, also_eval=None, bn_items=None):
    """Run the training schedule shared by 02, 05 and 06.

    step_loss(it) -> (loss tensor, {name: float}) computes one iteration's loss on the
    (DDP-wrapped) model. extra_state: {name: (state_dict_fn, load_fn)} saved in
    checkpoints (e.g. the EMA teacher). after_step(it) runs after the optimizer step.
    also_eval: {name: model} evaluated beside the model at every evaluation (e.g. 05's
    EMA teacher); their mIoU goes into the log and the metrics as '<name>_miou'.
    Writes out_dir/last.pt every --save-every, best.pt on the best target-val mIoU and
    log.jsonl; resume=True continues from last.pt. bn_items (05, 06 --bn-images): after the
    last iteration the model is evaluated once with the running statistics of training
    ('running_bn_miou', also '<name>_running_bn_miou'), then its batch norm statistics (and
    those of the also_eval models) are re-estimated on these target images
    (recompute_bn_statistics) before the final evaluation, best.pt and the returned state.
    Returns (final metrics, best metrics, final checkpoint state); the caller writes
    model.pt and the manifest."""
    device = next(model.parameters()).device
    rank, world = get_rank(), get_world()
    raw = model
    opt = make_optimizer(raw, args)
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp and device.type == "cuda")
    start, best = 0, {"miou": -1.0}
    out_dir = Path(out_dir)
    last = out_dir / "last.pt"
    if resume and last.exists():
        ck = load_checkpoint(last)
        load_state_strict(raw, ck["model"], what=str(last))
        opt.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
        for k, (_, load) in (extra_state or {}).items():
            load(ck["extra"][k])
        start, best = ck["iteration"], ck["best"]
        torch.set_rng_state(ck["rng"]["torch"])
        log0(f"resuming from {last} at iteration {start}")
    args._start_iter = start
    log_path = out_dir / "log.jsonl"
    t_last, it_last = time.time(), start
    hist = []

    def state(it):
        return {"model": raw.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                "iteration": it, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                "best": best, "rng": {"torch": torch.get_rng_state()},
                "extra": {k: fn() for k, (fn, _) in (extra_state or {}).items()}}

    def run_eval():
        cm = evaluate(raw, eval_items, eval_kind, device, args.source,
                      flip=args.eval_flip, rank=rank, world=world)
        metrics = summarize_iou(cm, args.source)
        for name, other in (also_eval or {}).items():
            metrics[f"{name}_miou"] = summarize_iou(evaluate(
                other, eval_items, eval_kind, device, args.source, flip=args.eval_flip,
                rank=rank, world=world, desc=f"eval {name}"), args.source)["miou"]
        return cm, metrics

    def reestimate_bn():  # the model's and the also_eval models' statistics, on bn_items
        for m in [raw, *(also_eval or {}).values()]:
            recompute_bn_statistics(m, bn_items, device)

    def eval_and_report(at):
        """Evaluate after `at` iterations: print the table, log it, keep best.pt. After the
        last one with bn_items: first with the running statistics, then re-estimated."""
        nonlocal best
        before = {}
        if bn_items and at == args.iters:
            _, run_metrics = run_eval()
            before = {"running_bn_miou": run_metrics["miou"],
                      **{f"{n}_running_bn_miou": run_metrics[f"{n}_miou"] for n in also_eval or {}}}
            reestimate_bn()
            log0(f"target val mIoU {run_metrics['miou']:.1f} with the running batch norm statistics "
                 f"of training; re-estimated on {len(bn_items)} target training images:")
        cm, metrics = run_eval()
        metrics.update(before)
        if rank == 0:
            print(iou_table(cm, args.source, f"target val after {at} iterations"), flush=True)
            for name in also_eval or {}:
                print(f"{name}: target val mIoU {metrics[name + '_miou']:.1f} "
                      f"(model {metrics['miou']:.1f})", flush=True)
            if metrics["miou"] > best["miou"]:
                best = {**metrics, "iteration": at}
                save_checkpoint(out_dir / "best.pt", **state(at))
            # the log line last: once it is written, this evaluation is complete (best.pt too)
            with open(log_path, "a") as f:
                f.write(json.dumps({"iter": at, "val": metrics}) + "\n")
        return metrics

    def logged_eval(at):
        """The evaluation after `at` iterations that log.jsonl already holds, or None."""
        found = None
        if log_path.exists():
            for line in log_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if rec.get("iter") == at and "val" in rec:
                    found = rec["val"]
        return found

    metrics = None
    if resume and last.exists() and ck.get("eval_pending"):
        # last.pt is written before each evaluation (eval_pending). If that evaluation
        # finished, its log line says so: take its figures (best.pt was saved before the
        # line), so rerunning a finished run neither evaluates again nor logs it twice.
        # Otherwise it did not finish: do it now.
        done_before = logged_eval(start) if rank == 0 else None
        if world > 1:  # every rank takes the same branch (only rank 0 writes the log)
            shared = [done_before]
            dist.broadcast_object_list(shared, src=0)
            done_before = shared[0]
        if done_before is None:
            metrics = eval_and_report(start)
        else:
            if bn_items and start == args.iters:  # the state to return carries the re-estimate
                reestimate_bn()
            metrics = done_before
            if metrics["miou"] > best["miou"]:
                best = {**metrics, "iteration": start}
            log0(f"the evaluation after {start} iterations is in {log_path}: not repeated")
    for it in range(start, args.iters):
        for g in opt.param_groups:
            g["lr"] = poly_lr(args.lr, it, args.iters, args.power, args.warmup_iters) * g["lr_mult"]
        with autocast(device, args.amp):
            loss, parts = step_loss(it)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"non-finite loss at iteration {it}: "
                                + ", ".join(f"{k}={v:.4g}" for k, v in parts.items()))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if after_step:
            after_step(it)
        done = it + 1
        if rank == 0:
            hist.append(parts)
        if rank == 0 and (done % args.log_every == 0 or done == args.iters):
            dt = time.time() - t_last
            ips = (done - it_last) * args.batch_size * world / max(dt, 1e-9)
            eta = (args.iters - done) * dt / max(1, done - it_last)
            avg = {k: float(np.mean([h[k] for h in hist])) for k in hist[0]}
            rec = {"iter": done, **{k: round(v, 5) for k, v in avg.items()},
                   "lr": opt.param_groups[0]["lr"], "img_per_s": round(ips, 2), "eta_s": round(eta)}
            print(f"it {done}/{args.iters} " + " ".join(f"{k} {v:.4f}" for k, v in avg.items())
                  + f" lr {rec['lr']:.2e} {ips:.1f} img/s ETA {datetime.timedelta(seconds=int(eta))}",
                  flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            hist, t_last, it_last = [], time.time(), done
        due = done % args.eval_every == 0 or done == args.iters
        # last.pt before the evaluation, so an evaluation that fails loses no training;
        # eval_pending makes a run resumed from it evaluate that iteration first
        if rank == 0 and (due or done % args.save_every == 0):
            save_checkpoint(last, **state(done), eval_pending=due)
        if due:
            metrics = eval_and_report(done)
        barrier()
    if metrics is None:  # resumed at the end: evaluate once for the summary
        if bn_items:  # last.pt holds training's statistics: both figures and the re-estimate again
            metrics = eval_and_report(args.iters)
        else:
            metrics = run_eval()[1]
    return metrics, best, state(args.iters)


def wrap_ddp(model, device):
    """SyncBatchNorm + DistributedDataParallel when running under torchrun."""
    if get_world() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda" else model
        return nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


# ============================================================================
# What stages read from each other
# ============================================================================
def stylized_source(args, stage=None, raw=False):
    """The source (image, label) items and a function giving the image each stage trains on:
    the GPA-stylized copy written by 01_stylize.py (the paper's setting), or the raw
    source image when raw=True (the GPA ablation). Registers 01's manifest on `stage`."""
    items = source_items(args.data, args.source)
    if raw:
        return items, None
    m = stage.use("01_stylize") if stage else read_manifest(args.work, "01_stylize")
    if m["args"]["source"] != args.source:
        raise StageError(f"{stage_dir(args.work, '01_stylize')} holds a stylized {m['args']['source']} "
                         f"but --source is {args.source}: run 01_stylize.py --source {args.source}")
    excluded = m.get("excluded") or {}
    if excluded:  # unreadable source images that 01 recorded: every later stage skips them
        first = next(iter(excluded.items()))
        warn(f"{len(excluded)} source image(s) excluded by 01_stylize because they are unreadable, "
             f"e.g. {first[1]} (listed in {stage_dir(args.work, '01_stylize') / 'manifest.json'}; "
             f"replace them and rerun 01_stylize.py to use them)")
        items = [it for it in items if item_name(it[0]) not in excluded]
    image_for = InFolder(stage_dir(args.work, "01_stylize") / "images")
    missing = [p for p, _ in items if not image_for(p).exists()]
    if missing:
        raise StageError(f"{image_for(missing[0])} not found ({len(missing)} stylized images missing): "
                         f"run 01_stylize.py first")
    return items, image_for


class InFolder:
    """image path -> folder/<same file name> (picklable, for data-loader workers)."""

    def __init__(self, folder, suffix=None):
        self.folder, self.suffix = Path(folder), suffix

    def __call__(self, p):
        name = item_name(p)
        return self.folder / (Path(name).stem + self.suffix if self.suffix else name)


def target_train_items(data):
    """Cityscapes train images (labels kept where they exist, for reports only)."""
    return cityscapes_items(data, "train", with_labels=False)


def target_val_items(data):
    return cityscapes_items(data, "val", with_labels=True)


def label_kind(source):
    return {"gta5": "gta5", "synthia": "synthia"}[source]


# ============================================================================
# Self-training plumbing shared by 05 and 06
# ============================================================================
def check_made_from(stage, name, made_from):
    """Fail when upstream stage `name` was built from another run of `made_from` than the
    one this stage uses (e.g. 03's pseudo labels from an older warm-up model)."""
    want = stage.upstream[made_from].get("run_id")
    got = stage.upstream[name].get("upstream", {}).get(made_from)
    if got != want:
        raise StageError(f"{stage_dir(stage.args.work, name)} is stale: it was made from another run "
                         f"of {STAGES[made_from]} than {stage_dir(stage.args.work, made_from)}: "
                         f"run {STAGES[name]} again")


def check_stm_chain(stage):
    """The transferability maps of 04 must come from the run of 03 this stage uses: Eq. (8)
    groups the target pixels by 03's pseudo labels. A 04 that grouped them by the warm-up
    argmax is accepted only when asked for (04_stm.py --entropy-labels argmax), not when
    04 fell back to it because 03 had not finished."""
    m4 = stage.upstream["04_stm"]
    used = m4.get("summary", {}).get("entropy_labels", "")
    if "03_maps" in used or "03_maps" in m4.get("upstream", {}):
        check_made_from(stage, "04_stm", "03_maps")
    elif m4.get("args", {}).get("entropy_labels") != "argmax":
        raise StageError(f"{stage_dir(stage.args.work, '04_stm')} grouped Eq. (8) by the warm-up "
                         f"argmax because 03_maps had not finished when it ran: run 04_stm.py again "
                         f"(the paper's setting), or 04_stm.py --entropy-labels argmax to ask for "
                         f"the argmax")


def source_dataset(args, stage, use_stm=True):
    """The stylized source with its labels and, with use_stm, the STM weights of 04
    (Eq. (9), 8-bit PNGs) following every scale, crop and flip of the image."""
    items, image_for = stylized_source(args, stage)
    extra = {}
    if use_stm:
        stage.use("04_stm")
        folder = stage_dir(args.work, "04_stm") / "stm"
        extra["stm"] = InFolder(folder)
        missing = [p for p, _ in items if not extra["stm"](p).exists()]
        if missing:
            raise StageError(f"{extra['stm'](missing[0])} not found ({len(missing)} of {len(items)} "
                             f"source images have no transferability map): run 04_stm.py again")
    return SegDataset(items, label_kind(args.source), crop=tuple(args.crop), scale=tuple(args.scale),
                      jitter=args.jitter, extra=extra, image_for=image_for,
                      base=base_resize(args, args.source))


def target_dataset(args, labels_dir, producer):
    """Cityscapes train images with pseudo labels (trainId PNGs named after the images)
    from `labels_dir`; a missing, extra or wrongly sized label is a stale-input error."""
    labels_dir = Path(labels_dir)
    images = [p for p, _ in target_train_items(args.data)]
    names = {item_name(p) for p in images}
    have = {p.name for p in labels_dir.glob("*.png")} if labels_dir.is_dir() else set()
    missing, extra = sorted(names - have), sorted(have - names)
    if missing or extra:
        what = (f"{len(missing)} target images have no pseudo label (e.g. {labels_dir / missing[0]})"
                if missing else f"{len(extra)} pseudo labels belong to no target image (e.g. {extra[0]})")
        raise StageError(f"{labels_dir}: pseudo labels are for a different target set: {what}: "
                         f"run {STAGES[producer]} again")
    for p in images:
        if image_size(p) != image_size(labels_dir / item_name(p)):
            raise StageError(f"{labels_dir / item_name(p)}: size {image_size(labels_dir / item_name(p))} "
                             f"differs from its image {p} {image_size(p)}: run {STAGES[producer]} again")
    return SegDataset([(p, labels_dir / item_name(p)) for p in images], "trainid",
                      crop=tuple(args.crop), scale=tuple(args.scale), jitter=args.jitter,
                      base=base_resize(args, "cityscapes"))


def base_resize(args, dataset):
    """The base-resize factors of `dataset` (BASE_RESIZE), or none with --base-resize native."""
    return BASE_RESIZE[dataset] if getattr(args, "base_resize", "official") == "official" else (1.0, 1.0)


def kl_divergence(teacher_logits, student_logits, mask=None):
    """Eq. (12) at the official scale: KL(p~ || p) = sum_c p~_c (log p~_c - log p_c) per
    pixel, divided by the number of classes C and averaged over the pixels where mask is
    True.

    Why divide by C: the paper's lambda = 20 (Sec. 4.2) was tuned on the official code,
    whose consistency term is torch's nn.KLDivLoss() with its default reduction 'mean',
    i.e. the average over every (pixel, class) element (luyvlei/BiSMAPs
    models/adaptation_model.py, CustomModel.step, the `loss_consist` line). That is the
    per-pixel KL / C. Summing over classes instead would make lambda = 20 act like
    lambda = 20 C = 380 in the official code. Log-probabilities for the student,
    probabilities for the teacher: the form torch's kl_div expects (input = log q,
    target = p)."""
    lt = teacher_logits.float().log_softmax(1)                 # (B, C, H, W)
    ls = student_logits.float().log_softmax(1)
    kl = (lt.exp() * (lt - ls)).sum(1) / lt.shape[1]           # (B, H, W)  Eq. (12), / C
    if mask is None:
        return kl.mean()
    return kl[mask].sum() / mask.sum().clamp(min=1)


@contextlib.contextmanager
def frozen_bn_statistics(model, enabled=True):
    """Forwards inside normalise with their own batch statistics (training mode) but leave
    every batch norm's running statistics as they were (momentum 0 for the duration).
    enabled=False: a no-op, the forwards update them as usual."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if enabled else []
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def add_bn_stats_arg(group, others):
    """--bn-stats of 05 and 06: which training forwards update the student's batch-norm
    running statistics, the ones evaluation, the next stage and the export use. `others`
    names the forwards that leave them alone under 'target'."""
    group.add_argument("--bn-stats", default="target", choices=["target", "official"],
                       help="which forwards update the student's batch-norm running statistics (the "
                            "ones evaluation and export use): 'target' (default) only the clean target "
                            f"batch; the {others} forwards normalise with their own statistics and leave them alone; "
                            "'official' every forward, as the official code does (a blend of the domains "
                            "that no test image has)")


def add_bn_images_arg(group):
    """--bn-images of 05 and 06 (see recompute_bn_statistics)."""
    group.add_argument("--bn-images", type=int, default=0,
                       help="before the final evaluation and the saved model.pt, re-estimate every "
                            "batch norm's running statistics on this many target training images "
                            "(evenly spaced, whole images as evaluation and export see them, no "
                            "augmentation; the summary then reports both figures). Default 0: keep "
                            "the running averages of training, as the official code does; on the "
                            "toy target, whose scenes differ from the source's in content, the "
                            "re-estimate lowered 05 and 02 alike (README, 'Self-training (05) and distillation (06)')")


def bn_images(items, n):
    """n evenly spaced items (all when n >= len(items)): every city of Cityscapes' sorted
    list, with no random draw (the recalibration is the same on every rank and rerun)."""
    if n <= 0 or not items:
        return []
    if n >= len(items):
        return list(items)
    return [items[(k * len(items)) // n] for k in range(n)]


@torch.no_grad()
def recompute_bn_statistics(model, items, device, batch_size=8):
    """Re-estimate every batch norm's running mean and variance on whole target images
    (torch.optim.swa_utils.update_bn: running statistics reset, then the cumulative
    average over the batches, the model's other weights untouched; training mode and
    each momentum restored afterwards).
    Why: the running averages of training come from what the training forwards saw
    (augmented crops: colour jitter, random scale, 128x64 crops on the toy data, 896x512 on
    the real data, where ASPP's image-pooling branch pools a crop rather than a scene),
    and with momentum 0.1 from the last few dozen batches. Evaluation and the exported
    model see whole, unaugmented target images (Wu & Johnson, "Rethinking 'Batch' in
    BatchNorm", 2021). On the earlier toy data (a photometric shift only) this raised 05
    (32.5 -> 37.1, seed 0); on the content-shifted toy target it lowers 02 and 05, as
    AdaBN does when the domains differ in what the scenes hold, so 05 and 06 only do it
    with --bn-images N (default 0, the official behaviour).
    items: [(image path, _), ...]; batch_size >= 2 (ASPP's pooled branch normalises one
    value per image). update_bn averages each batch's variance, which holds only
    (B - 1) / B of the variance between images: 8 images per batch keep 7/8 of it (the
    earlier toy 05 of seed 0 scored 36.3 with batches of 2, 37.1 with 4 and 8), at no more memory
    than a few activation maps of 8 whole images without gradients. Every rank runs the
    same images, so the statistics agree across ranks (with SyncBatchNorm the ranks'
    identical batches average to the same values)."""
    from torch.optim.swa_utils import update_bn
    if batch_size < 2:
        raise ValueError(f"recompute_bn_statistics: batch_size must be >= 2, got {batch_size}")
    paths = [p for p, _ in items]

    def batches():  # consecutive images of one size; a lone image goes with its mirror image
        group = []
        for p in paths + [None]:
            img = None if p is None else image_tensor(p)[0]
            if group and (img is None or len(group) == batch_size or img.shape != group[0].shape):
                if len(group) == 1:
                    group.append(group[0].flip(-1))
                yield normalize(torch.stack(group).to(device))
                group = []
            if img is not None:
                group.append(img)

    was_training = model.training
    update_bn(batches(), model)
    model.train(was_training)
    return len(paths)


@torch.no_grad()
def teacher_forward(teacher, x, bn="batch"):
    """The mean teacher's forward as in the official code: batch norm in training mode,
    so it normalises with the statistics of this target batch, and every dropout off
    (luyvlei/BiSMAPs models/adaptation_model.py, CustomModel.step: BaseNet_ema.train(),
    then decoder.last_conv[-2].eval(), the Dropout2d before the classifier). The
    running statistics it touches are overwritten by ema_update's buffer copy.
    bn="running": the whole teacher in eval mode instead (its running statistics, which
    ema_update copies from the student)."""
    if bn == "running":
        return teacher.eval()(x)
    teacher.train()
    for m in teacher.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return teacher(x)


def upsample(logits, size):
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


# ============================================================================
# Expected errors: one line and a non-zero exit status (a traceback only with --debug)
# ============================================================================
# What a user can cause and fix: bad input, a missing or stale stage, a file that cannot
# be written, a diverging run. Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (DataError, StageError, WriteError, NonFiniteLoss, FileNotFoundError,
                   PermissionError, IsADirectoryError, NotADirectoryError)
HINTS = {DataError: "fix, replace or give the file or folder named above",
         StageError: "run the script named above",
         WriteError: "",
         NonFiniteLoss: "lower --lr, or check the input data (try --no-amp on CUDA)",
         FileNotFoundError: "check the path", PermissionError: "check the permissions",
         IsADirectoryError: "", NotADirectoryError: ""}


def run_main(main, argv=None):
    """Run a stage's main(); an expected error prints `error: ...` (and a hint) on stderr and
    exits with status 1, without a traceback unless --debug is given. After any failure, a
    note says where the finished run it was to replace is kept (Stage.set_aside_finished_run)."""
    global _SET_ASIDE
    argv = sys.argv[1:] if argv is None else argv
    _SET_ASIDE = None
    failed = True
    try:
        rc = main(argv)
        failed = isinstance(rc, int) and rc != 0
    except EXPECTED_ERRORS as e:
        if "--debug" in argv:
            raise
        hint = next((h for t, h in HINTS.items() if isinstance(e, t)), "")
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if get_rank() == 0:
            print(f"error: {msg}" + (f"\nhint: {hint} (--debug shows the traceback)" if hint else ""),
                  file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        if failed and _SET_ASIDE and get_rank() == 0 and _SET_ASIDE[1].exists():
            d, prev = _SET_ASIDE
            print(f"note: the finished run this one was to replace is kept in {prev}; to go back "
                  f"to it: rm -rf {d} && mv {prev} {d}", file=sys.stderr, flush=True)
    sys.exit(rc if isinstance(rc, int) else 0)

"""04_stm.py: the Source Transferability Map, the paper's "backward direction"
(BiSMAP Sec. 3.4, Eq. (7)-(9); encoder choice Sec. 4.2).

Source pixels that lie far from the target domain in the feature space of a third-party
encoder E-hat get a small weight in 05's source loss (Eq. (10)); a class whose target
predictions are uncertain keeps a high lower bound, so the tail classes are not starved.
  1. Target prototypes: E-hat (a ResNet truncated after layer4) embeds the target training
     images; K-means with J clusters on a uniform random sample of at most --samples of
     their feature vectors gives the prototypes A_1..A_J.
  2. Eq. (7): D_i = min_j ||f-hat_i - A_j||_2 for every source position i (encoder resolution).
  3. d_mean: the mean of D over every position of every source image (exact float64 sums).
  4. Eq. (8): e_c, the mean normalised softmax entropy of the warm-up model over target
     pixels whose pseudo label is c (03's MAPs labels when 03 has finished, otherwise the
     warm-up argmax), min-max normalised over the classes to e'_c.
  5. Eq. (9): w_i = min(exp(-D_i^2 / d_mean^2 * log 2) + e'_c, 1), c the source label at i;
     D upsampled to the label size by nearest neighbour (the paper's footnote 1).

Reads:  work/01_stylize/images (the stylized source that 05 trains on; --source-images raw
        for the GPA ablation), the source labels, data/cityscapes/leftImg8bit/train,
        work/02_warmup/model.pt, work/03_maps/labels/<target image name> (when 03 finished)
Writes: work/04_stm/
          prototypes.npy          (J, D) float32 target prototypes A_j (+ kmeans.json)
          class_entropy.npy       (19,) e_c, NaN for a class with no target pixel
          class_entropy_norm.npy  (19,) e'_c of Eq. (8); 1 for an absent class
          class_entropy_pixels.npy (19,) target pixels behind each e_c
          distance/<stem>.npy     D of Eq. (7), float32 (h, w) at encoder resolution
          stm/<source image name> w of Eq. (9) as an 8-bit PNG of round(255 w), the label's
                                  size (05 reads it through common.source_dataset)
          previews/<name>         image | label | distance term | STM, for a person to look at
          manifest.json           J, d_mean, entropies, mean w per class, encoder, timings

Real data (one GPU; ImageNet weights are downloaded by torchvision on first use):
    python 04_stm.py --data data --work work --source gta5
  several GPUs:   torchrun --nproc_per_node 4 04_stm.py --data data --work work
  the paper's encoder (SimCLRv2 ResNet-152 1x with selective kernels, the file written by the
  public converter, README.md "Real data"), fed as the official code feeds it ([0, 1] pixels,
  256x128 input, (1, 2) average pool: see SIMCLR_INPUT below for the lines followed):
    python 04_stm.py --encoder simclr-r152-1x-sk1 --encoder-weights pretrained/r152_1x_sk1.pth
Toy data (CPU, well under a minute; offline, so a random encoder: NOT the paper's setting):
    python 04_stm.py --data data --work work --encoder resnet18 --encoder-weights none \\
        --encoder-scale 2 --clusters 8 --samples 20000 --workers 0
A killed run resumes (same arguments) without redoing finished images.
"""
import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import common

ENCODERS = {"resnet152": 2048, "resnet50": 2048, "resnet18": 512}  # name -> feature dim
# The paper's E-hat: SimCLRv2 ResNets in the public converter's layout (common.SimCLRResNet);
# simclr-r152-1x-sk1 is the one the official code uses (source_transferability_map.py l.26-27).
ENCODERS.update({f"simclr-r{d}-{w}x-sk{k}": 2048 * w for d in (50, 101, 152) for w in (1, 2)
                 for k in (0, 1)})
# How the official feature extractor feeds the SimCLRv2 E-hat (luyvlei/BiSMAPs):
#   pixels in [0, 1], no mean/std (configs/gta5_stm.yml l.10-12: img_norm, mean 0, std 1);
#   every image resized (PIL bilinear) to 256x128 (configs/gta5_stm.yml l.7-8 img_rows 128,
#   img_cols 256, applied in data/gta5_dataset.py and cityscapes_dataset.py __getitem__);
#   the layer4 map (output stride 32: 8x4) average-pooled over (1, 2) windows to 4x4
#   (source_transferability_map.py l.30 AvgPool2d(kernel_size=(1, 2), stride=(1, 2)), l.38).
SIMCLR_INPUT = {"pixels": "unit", "size": (256, 128), "pool": (1, 2)}
TORCHVISION_INPUT = {"pixels": "imagenet", "size": None, "pool": (1, 1)}


# ============================================================================
# The formulas (pure functions, unit-tested on hand-checkable numbers)
# ============================================================================
def nearest_prototype_distance(features, prototypes):
    """Eq. (7): D_i = min_j ||f_i - A_j||_2.  features (N, d), prototypes (J, d) -> (N,).

    Computed pairwise (not via |f|^2 - 2 f.A + |A|^2, which cancels badly when the
    features are large compared with their distances)."""
    d = torch.cdist(features.float(), prototypes.float(),
                    compute_mode="donot_use_mm_for_euclid_dist")  # (N, J)
    return d.min(1).values  # Eq. (7)


def distance_term(D, d_mean):
    """The feature-distance term of Eq. (9): exp(-D^2 / d_mean^2 * log 2).
    1 at D = 0, exactly 1/2 at D = d_mean, 1/16 at D = 2 d_mean."""
    D = np.asarray(D, np.float64)
    return np.exp(-(D / d_mean) ** 2 * math.log(2))  # Eq. (9), first term


def normalized_entropy(logits):
    """Per-pixel softmax entropy divided by log C, in [0, 1].  (B, C, H, W) -> (B, H, W)."""
    logp = logits.float().log_softmax(1)                          # (B, C, H, W)
    return -(logp.exp() * logp).sum(1) / math.log(logits.shape[1])


def class_entropy_sums(entropy, label, num_classes=common.NUM_CLASSES):
    """Per-class sums of `entropy` over the pixels labelled c (255 and other values >= C
    are left out) and the pixel counts: two (C,) float64 tensors. entropy, label: (H, W)."""
    label = label.reshape(-1).long()
    keep = label < num_classes
    lab, ent = label[keep], entropy.reshape(-1)[keep].double()
    return (torch.bincount(lab, weights=ent, minlength=num_classes),
            torch.bincount(lab, minlength=num_classes).double())


def class_entropy(sums, counts):
    """e_c of Eq. (8): the mean entropy of class c; NaN where the class has no pixel."""
    sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def normalize_class_entropy(e, classes=None):
    """Eq. (8): e'_c = (e_c - e_min) / (e_max - e_min), min and max over the classes present.

    `classes` limits the classes taking part (e.g. SYNTHIA's 16); the others, and any
    class with no target pixel (e_c = NaN), get e'_c = 1: the distance term cannot push
    their weight below 1, so what cannot be judged is never degraded. If all present
    classes share one entropy the normalisation is undefined; they get e'_c = 0 (the
    distance term alone decides). Both cases warn."""
    e = np.asarray(e, np.float64)
    out = np.ones_like(e)
    part = np.zeros(len(e), bool)
    part[list(range(len(e)) if classes is None else classes)] = True
    present = part & ~np.isnan(e)
    absent = np.flatnonzero(part & np.isnan(e))
    if len(absent):
        names = [common.CLASSES[c] if c < len(common.CLASSES) else str(c) for c in absent]
        warnings.warn(f"class entropy: no target pixel of {names}: their e' is set to 1 "
                      f"(those source pixels are never degraded)", stacklevel=2)
    if present.any():
        lo, hi = e[present].min(), e[present].max()
        if hi > lo:
            out[present] = (e[present] - lo) / (hi - lo)  # Eq. (8)
        else:
            warnings.warn("class entropy: every present class has the same entropy; e' = 0 "
                          "for all of them (Eq. (8) is 0/0)", stacklevel=2)
            out[present] = 0.0
    return out


def upsample_nearest(D, size):
    """(h, w) -> size (H, W) by nearest neighbour (pixel y takes row floor(y h / H)),
    the upsampling the paper's footnote 1 allows."""
    h, w = D.shape
    H, W = size
    rows = (np.arange(H) * h) // H
    cols = (np.arange(W) * w) // W
    return D[rows[:, None], cols[None, :]]


def transferability_map(D, label, e_norm, d_mean):
    """Eq. (9): w_i = min(exp(-D_i^2 / d_mean^2 log 2) + e'_{y_i}, 1).

    D: (H, W) distances already at the label's size; label: (H, W) trainIds, 255 ignore;
    e_norm: (C,) e'_c. Ignored pixels get the distance term alone. Returns float32 (H, W)."""
    lower = np.zeros(256, np.float64)            # e' by label value; 255 (ignore) -> 0
    lower[:len(e_norm)] = e_norm
    w = np.minimum(distance_term(D, d_mean) + lower[label], 1.0)  # Eq. (9)
    return w.astype(np.float32)


def weight_to_u8(w):
    """[0, 1] weights -> uint8 round(255 w) (what stm/*.png stores)."""
    return np.round(np.clip(w, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_stm(path):
    """An STM PNG written by this stage -> float32 weights in [0, 1] (within 1/510 of w)."""
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except FileNotFoundError:
        raise common.StageError(f"{path} not found: run 04_stm.py first") from None
    if arr.ndim != 2 or arr.dtype != np.uint8:
        raise common.DataError(f"{path}: expected an 8-bit single-channel STM PNG, found "
                               f"{arr.dtype} with shape {arr.shape}")
    return arr.astype(np.float32) / 255.0


def stm_files(stage_dir):
    """source image path -> (its distance map, its STM) inside work/04_stm: distance/<stem>.npy
    and stm/<image file name> (the name 05 looks for, common.source_dataset)."""
    return (common.InFolder(Path(stage_dir) / "distance", ".npy"),
            common.InFolder(Path(stage_dir) / "stm"))


# ============================================================================
# The third-party encoder E-hat
# ============================================================================
def build_encoder(name="resnet152", weights="imagenet", stride=32, size=None):
    """E-hat: a ResNet up to layer4 (no pooling, no fc); (B, 3, H, W) ->
    (B, d, H/stride, W/stride), d = 2048 (resnet152/50, SimCLRv2 1x), 4096 (2x), 512 (resnet18).

    torchvision ResNets: weights 'imagenet' (torchvision's IMAGENET1K_V1, downloaded on
    first use), 'none' (random init), or a torchvision-layout state dict, loaded strictly
    (a missing `fc.` is fine); ImageNet-normalised input at the image's own size.
    simclr-r<depth>-<w>x-sk<0|1>: a SimCLRv2 ResNet; weights 'none' or the converter's file
    (r152_1x_sk1.pth), loaded strictly (common.load_simclr); input prepared as the official
    feature extractor does (SIMCLR_INPUT): [0, 1] pixels, resized to 256x128, features
    average-pooled over (1, 2). `size` = (W, H) overrides the input size for either kind.
    The encoder carries its input recipe as `.input_spec` (read by encode()).
    stride 16 dilates layer4 instead of striding it (not resnet18: torchvision's BasicBlock
    has no dilation)."""
    if name not in ENCODERS:
        raise ValueError(f"--encoder must be one of {list(ENCODERS)}, got {name!r}")
    if name.startswith("simclr-"):
        enc = common.build_simclr(name, weights, output_stride=stride, what="--encoder-weights").net
        spec = dict(SIMCLR_INPUT)
    else:
        net = common.build_resnet(name, weights, output_stride=stride, flag="--encoder-weights")
        enc = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                            net.layer1, net.layer2, net.layer3, net.layer4)
        spec = dict(TORCHVISION_INPUT)
    if size is not None:
        spec["size"] = tuple(int(v) for v in size)
    enc.input_spec = spec
    return enc.eval()


def encoder_input(encoder, img_u8, scale=1.0):
    """The tensor E-hat sees for one (3, H, W) uint8 image: (1, 3, h, w) float, following
    encoder.input_spec: ImageNet-normalised or [0, 1] pixels; resized to spec['size'] (W, H)
    when set (bilinear with antialiasing, as PIL's resize), else by `scale`."""
    spec = getattr(encoder, "input_spec", TORCHVISION_INPUT)
    if spec["pixels"] == "unit":
        x = img_u8[None].float() / 255.0                               # (1, 3, H, W) in [0, 1]
    else:
        x = common.normalize(img_u8[None])                             # (1, 3, H, W)
    if spec["size"] is not None:
        w, h = spec["size"]
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=h < x.shape[-2] or w < x.shape[-1])
    elif scale != 1.0:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False,
                          antialias=scale < 1.0)
    return x


@torch.no_grad()
def encode(encoder, img_u8, scale=1.0, amp=True):
    """E-hat features of one image: (3, H, W) uint8 on the device -> ((h*w, d) float32, (h, w)).
    Input preparation and output pooling follow encoder.input_spec (build_encoder)."""
    x = encoder_input(encoder, img_u8, scale)                          # (1, 3, h', w')
    with common.autocast(x.device, amp):
        f = encoder(x).float()                                         # (1, d, h, w)
    pool = getattr(encoder, "input_spec", TORCHVISION_INPUT)["pool"]
    if tuple(pool) != (1, 1):
        f = F.avg_pool2d(f, kernel_size=pool, stride=pool)             # (1, d, h/ph, w/pw)
    if not torch.isfinite(f).all():
        raise FloatingPointError("E-hat features are not finite (fp16 overflow? try --no-amp)")
    return f[0].flatten(1).T, tuple(f.shape[-2:])                      # (h*w, d)


def all_reduce_sum(array, device):
    """Sum a float64 numpy array over the torchrun ranks (a no-op in one process)."""
    if common.get_world() == 1:
        return np.asarray(array, np.float64)
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.as_tensor(np.asarray(array, np.float64), device=dev)
    dist.all_reduce(t)
    return t.cpu().numpy()


# ============================================================================
# Step 1: target prototypes (K-means on E-hat features of the target images)
# ============================================================================
def sample_quotas(total, n_images):
    """Feature vectors to draw from each image so that the sample spreads uniformly over
    the images and holds at most `total`: total // n each, one more for the first total % n."""
    base, rem = divmod(total, n_images)
    return [base + (k < rem) for k in range(n_images)]


def feature_positions(size, scale=1.0, stride=32, input_size=None, pool=(1, 1)):
    """Positions of E-hat's feature map for an image of size (W, H): every stride-2 layer of
    a ResNet maps n to ceil(n / 2), so it is ceil(floor(H scale) / stride) x the same for W;
    with a fixed input_size (W, H) the image size does not matter; a (ph, pw) average pool
    then divides each side (rounding down)."""
    w, h = input_size if input_size is not None else (math.floor(v * scale) for v in size)
    return (math.ceil(h / stride) // pool[0]) * (math.ceil(w / stride) // pool[1])


def sample_target_features(encoder, paths, quotas, args, device, rng, dim):
    """quotas[k] random E-hat feature vectors of image k (all of them if it has fewer),
    written into one preallocated (sum(quotas), d) float32 array: no second copy."""
    X = np.empty((sum(quotas), dim), np.float32)
    n = 0
    for b in tqdm(common.image_loader(paths, args.workers), total=len(paths), desc="target features",
                  disable=common.get_rank() != 0):
        f, _ = encode(encoder, b["image"].to(device), args.encoder_scale, args.amp)  # (h*w, d)
        k = b["index"]
        m = min(quotas[k], len(f))
        keep = np.sort(rng.choice(len(f), size=m, replace=False))
        X[n:n + m] = f[torch.as_tensor(keep, device=f.device)].cpu().numpy()
        n += m
    return X[:n]


def target_prototypes(X, J, seed, algorithm="minibatch", batch_size=4096):
    """K-means cluster centres A_j (J, d) of the target features X (N, d), and the mean
    squared distance of X to its nearest centre."""
    from sklearn.cluster import KMeans, MiniBatchKMeans
    if len(X) < J:
        raise ValueError(f"K-means needs at least J = {J} target feature vectors, found {len(X)} "
                         f"(lower --clusters, or raise --encoder-scale / --samples)")
    if algorithm == "minibatch":
        km = MiniBatchKMeans(n_clusters=J, batch_size=batch_size, n_init=3, random_state=seed)
    else:
        km = KMeans(n_clusters=J, n_init=1, random_state=seed)
    km.fit(X)
    return km.cluster_centers_.astype(np.float32), float(km.inertia_) / len(X)


def prototypes_step(args, stage, encoder, targets, device, timings):
    """Sample target features (sharded over ranks), K-means on rank 0, prototypes.npy."""
    rank, world = common.get_rank(), common.get_world()
    out, info_path = stage.dir / "prototypes.npy", stage.dir / "kmeans.json"
    if not (out.exists() and info_path.exists()):
        t0 = time.time()
        rng = np.random.default_rng([args.seed, rank])
        paths = [p for p, _ in targets[rank::world]]
        spec = encoder.input_spec
        quotas = [min(q, feature_positions(common.image_size(p), args.encoder_scale, args.encoder_stride,
                                           spec["size"], spec["pool"]))
                  for q, p in zip(sample_quotas(args.samples, len(targets))[rank::world], paths)]
        X = sample_target_features(encoder, paths, quotas, args, device, rng, ENCODERS[args.encoder])
        if world > 1:  # ranks hand their samples to rank 0 through files (variable sizes)
            common.save_npy(stage.dir / f"kmeans_sample.rank{rank}.npy", X)
            del X
            common.barrier()
            if rank == 0:
                parts = [np.load(stage.dir / f"kmeans_sample.rank{r}.npy", mmap_mode="r")
                         for r in range(world)]
                X = np.empty((sum(len(q) for q in parts), parts[0].shape[1]), np.float32)
                n = 0
                for q in parts:
                    X[n:n + len(q)] = q
                    n += len(q)
                del parts
                for r in range(world):
                    (stage.dir / f"kmeans_sample.rank{r}.npy").unlink()
        timings["target_features_s"] = round(time.time() - t0, 1)
        if rank == 0:
            t0 = time.time()
            common.log0(f"K-means ({args.kmeans}): J = {args.clusters} on {len(X):,} x {X.shape[1]} "
                        f"target feature vectors ...")
            A, msd = target_prototypes(X, args.clusters, args.seed, args.kmeans)
            timings["kmeans_s"] = round(time.time() - t0, 1)
            # the target's own distance to its prototypes: a yardstick for the source's d_mean
            D_t = torch.cat([nearest_prototype_distance(torch.from_numpy(c).to(device),
                                                        torch.from_numpy(A).to(device)).cpu()
                             for c in np.array_split(X, max(1, len(X) // 65536))])
            info = {"algorithm": args.kmeans, "samples": len(X), "dim": int(X.shape[1]),
                    "mean_sq_distance": msd, "target_mean_distance": float(D_t.double().mean()),
                    "target_features_s": timings["target_features_s"], "kmeans_s": timings["kmeans_s"]}
            common.save_npy(out, A)
            common.save_json(info_path, info)
            del X
    common.barrier()
    A = np.load(out)
    info = json.loads(info_path.read_text())
    timings.setdefault("target_features_s", info["target_features_s"])
    timings.setdefault("kmeans_s", info["kmeans_s"])
    if A.shape != (args.clusters, ENCODERS[args.encoder]):
        raise common.DataError(f"{out}: expected prototypes of shape ({args.clusters}, "
                               f"{ENCODERS[args.encoder]}), found {A.shape}")
    return A, info


# ============================================================================
# Step 2: class entropy on the target (Eq. (8))
# ============================================================================
def entropy_step(args, stage, targets, labels_dir, device, classes, timings):
    """e_c and e'_c from the warm-up model over the target training images (sharded)."""
    rank, world = common.get_rank(), common.get_world()
    files = [stage.dir / n for n in ("class_entropy.npy", "class_entropy_norm.npy",
                                     "class_entropy_pixels.npy")]
    if not all(f.exists() for f in files):
        t0 = time.time()
        model, _ = common.model_from_checkpoint(common.stage_dir(args.work, "02_warmup") / "model.pt",
                                                device, producer="02_warmup")
        C = common.NUM_CLASSES
        sums = torch.zeros(C, dtype=torch.float64, device=device)
        counts = torch.zeros(C, dtype=torch.float64, device=device)
        mine = targets[rank::world]
        for b in tqdm(common.image_loader([p for p, _ in mine], args.workers), total=len(mine),
                      desc="class entropy", disable=rank != 0):
            with torch.no_grad(), common.autocast(device, args.amp):
                logits = common.predict_logits(model, b["image"][None].to(device))  # (1, C, H, W)
            ent = normalized_entropy(logits)[0]                                # (H, W)
            if labels_dir is None:
                lab = logits.argmax(1)[0]                                      # (H, W)
            else:
                p = labels_dir / common.item_name(mine[b["index"]][0])
                lab_np = common.decode_label(common.need(p, "03_maps", "a MAPs pseudo label"), "trainid")
                if lab_np.shape != tuple(ent.shape):
                    raise common.DataError(f"{p}: pseudo label is {lab_np.shape[1]}x{lab_np.shape[0]} "
                                           f"but its target image is {ent.shape[1]}x{ent.shape[0]}")
                lab = torch.from_numpy(lab_np).to(device)
            s, n = class_entropy_sums(ent, lab, C)
            sums += s
            counts += n
        sums = all_reduce_sum(sums.cpu().numpy(), device)
        counts = all_reduce_sum(counts.cpu().numpy(), device)
        e = class_entropy(sums, counts)
        if rank == 0:
            common.save_npy(files[0], e)
            common.save_npy(files[1], normalize_class_entropy(e, classes))  # Eq. (8)
            common.save_npy(files[2], counts)
        timings["class_entropy_s"] = round(time.time() - t0, 1)
        del model
    common.barrier()
    return [np.load(f) for f in files]


# ============================================================================
# Step 3: Eq. (7) distance maps and d_mean (pass 1 over the source)
# ============================================================================
def distance_step(args, stage, encoder, A, items, image_for, device):
    """Write distance/<stem>.npy for the images that lack one; return the exact d_mean:
    the float64 sum of D over all positions of all source images / their number (summed
    from the saved maps, so a resumed run gets the same figure)."""
    rank, world = common.get_rank(), common.get_world()
    A_t = torch.from_numpy(A).to(device)                                 # (J, d)
    mine = [p for p, _ in items[rank::world]]
    dist_for = stm_files(stage.dir)[0]
    path = [dist_for(p) for p in mine]
    sums, counts = np.zeros(len(mine)), np.zeros(len(mine))   # per image, summed in order
    todo = []
    for k, f in enumerate(path):
        if f.exists():  # atomic files: existing == complete
            D = np.load(f)
            sums[k], counts[k] = D.sum(dtype=np.float64), D.size
        else:
            todo.append(k)
    srcs = [image_for(mine[k]) if image_for else mine[k] for k in todo]
    for b in tqdm(common.image_loader(srcs, args.workers), total=len(todo), desc="Eq. (7) distances",
                  disable=rank != 0):
        f, (h, w) = encode(encoder, b["image"].to(device), args.encoder_scale, args.amp)  # (h*w, d)
        D = nearest_prototype_distance(f, A_t).view(h, w).cpu().numpy()            # (h, w)  Eq. (7)
        k = todo[b["index"]]
        common.save_npy(path[k], D)
        sums[k], counts[k] = D.sum(dtype=np.float64), D.size
    total, count = all_reduce_sum([sums.sum(), counts.sum()], device)
    if count == 0:
        raise common.DataError("no source feature position: no source image was read")
    return total / count, int(count)


# ============================================================================
# Step 4: Eq. (9) transferability maps (pass 2 over the source, CPU workers)
# ============================================================================
class STMWriter(torch.utils.data.Dataset):
    """Item k: write stm/<image name> for source image k (unless it exists) and return
    per-label-value sums of w and of the distance term, and the pixel counts (256,)."""

    def __init__(self, items, stage_dir, kind, e_norm, d_mean):
        self.items, self.dir, self.kind = items, Path(stage_dir), kind
        self.e_norm, self.d_mean = e_norm, d_mean

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        img_p, lab_p = self.items[k]
        dist_for, stm_for = stm_files(self.dir)
        lab = common.decode_label(lab_p, self.kind)                               # (H, W)
        D = upsample_nearest(np.load(dist_for(img_p)), lab.shape)                # (H, W)
        out = stm_for(img_p)
        if out.exists():  # atomic files: existing == complete
            with Image.open(out) as im:
                w8 = np.asarray(im)
            if w8.shape != lab.shape:
                raise common.DataError(f"{out}: STM is {w8.shape[1]}x{w8.shape[0]} but label {lab_p} "
                                       f"is {lab.shape[1]}x{lab.shape[0]}: delete work/04_stm and rerun")
        else:
            w8 = weight_to_u8(transferability_map(D, lab, self.e_norm, self.d_mean))  # Eq. (9)
            common.save_png(out, w8)
        flat = lab.ravel()
        return {"w": np.bincount(flat, weights=w8.ravel() / 255.0, minlength=256),
                "dist": np.bincount(flat, weights=distance_term(D, self.d_mean).ravel(), minlength=256),
                "n": np.bincount(flat, minlength=256).astype(np.float64)}


def stm_step(args, stage, items, e_norm, d_mean, device):
    rank, world = common.get_rank(), common.get_world()
    mine = items[rank::world]
    ds = STMWriter(mine, stage.dir, common.label_kind(args.source), e_norm, d_mean)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers)
    acc = {k: np.zeros(256) for k in ("w", "dist", "n")}
    for r in tqdm(loader, total=len(mine), desc="Eq. (9) STM", disable=rank != 0):
        for k in acc:
            acc[k] += np.asarray(r[k], np.float64)
    return {k: all_reduce_sum(v, device) for k, v in acc.items()}


# ============================================================================
# Previews: a person looks at which source regions are degraded
# ============================================================================
def heat(values, image=None, alpha=0.6):
    """[0, 1] values -> an RGB heat map (inferno: dark = degraded), blended over `image`."""
    import cv2
    hm = cv2.applyColorMap(weight_to_u8(values), cv2.COLORMAP_INFERNO)[..., ::-1].astype(np.float32)
    if image is not None:
        hm = alpha * hm + (1 - alpha) * image.astype(np.float32)
    return hm.clip(0, 255).astype(np.uint8)


def write_previews(args, stage, items, image_for, d_mean, n):
    """2x2 panels: stylized source | label overlay / distance term | STM (Eq. (9))."""
    import cv2
    kind = common.label_kind(args.source)
    for img_p, lab_p in items[:n]:
        dist_for, stm_for = stm_files(stage.dir)
        img = common.read_image(image_for(img_p) if image_for else img_p)
        lab = common.decode_label(lab_p, kind)
        D = upsample_nearest(np.load(dist_for(img_p)), lab.shape)
        w = read_stm(stm_for(img_p))
        panels = [("source image", img), ("label", common.overlay(img, lab)),
                  ("distance term (dark 0, yellow 1)", heat(distance_term(D, d_mean), img)),
                  ("STM w, Eq. (9) (dark 0, yellow 1)", heat(w, img))]
        tiles = []
        for title, p in panels:
            s = min(1.0, 800 / p.shape[1])
            p = cv2.resize(p, (round(p.shape[1] * s), round(p.shape[0] * s)),
                           interpolation=cv2.INTER_AREA) if s < 1 else p
            if p.shape[1] < 400:  # the toy images are tiny: blow them up for the eye
                f = 400 // p.shape[1] + 1
                p = cv2.resize(p, (p.shape[1] * f, p.shape[0] * f), interpolation=cv2.INTER_NEAREST)
            p = np.ascontiguousarray(p)
            cv2.putText(p, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(p)
        grid = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0)
        common.save_png(stage.dir / "previews" / common.item_name(img_p), grid)


# ============================================================================
# main
# ============================================================================
def per_class(values, counts=None, ids=range(common.NUM_CLASSES)):
    """{class name: value (or values / counts)} for the manifest; None where undefined."""
    out = {}
    for c in ids:
        v = float(values[c]) if counts is None else (float(values[c] / counts[c]) if counts[c] > 0 else None)
        out[common.CLASSES[c] if c < common.NUM_CLASSES else str(c)] = \
            None if v is None or math.isnan(v) else round(v, 5)
    return out


def stm_table(s):
    """The per-class view of the summary: e_c, e'_c, mean distance term, mean w, pixels."""
    def f(v, fmt):
        return format(v, fmt) if v is not None else "-".rjust(len(format(0.0, fmt)))
    lines = [f"{'class':>11} {'e_c':>7} {'e_c norm':>8} {'dist term':>9} {'mean w':>7} {'src pixels':>11}"]
    for k in common.CLASSES:
        lines.append(f"{k:>11} {f(s['class_entropy'][k], '7.4f')} {f(s['class_entropy_norm'][k], '8.3f')} "
                     f"{f(s['distance_term_mean_per_class'][k], '9.3f')} "
                     f"{f(s['stm_mean_per_class'][k], '7.3f')} {int(s['source_pixels_per_class'][k]):11d}")
    return "\n".join(lines)


def pseudo_labels_dir(args, stage):
    """03's pseudo-label folder when Eq. (8) groups pixels by it, else None (warm-up argmax).
    auto: 03 when it has finished; a 03 made from another warm-up run or source is an error."""
    if args.entropy_labels == "argmax":
        return None
    try:
        m3 = stage.use("03_maps")
    except common.StageError as e:
        if args.entropy_labels == "maps":
            raise
        loud_warning(f"04_stm: {e}.\nEq. (8) FALLS BACK to grouping the target pixels by the warm-up "
                     f"argmax instead of 03's MAPs pseudo labels (the paper's setting), and "
                     f"05_selftrain.py will refuse these maps. Run 03_maps.py first, or pass "
                     f"--entropy-labels argmax to ask for the argmax.")
        return None
    if m3["args"]["source"] != args.source:
        raise common.StageError(f"{common.stage_dir(args.work, '03_maps')} holds pseudo labels of a "
                                f"{m3['args']['source']} model but --source is {args.source}: run "
                                f"03_maps.py --source {args.source}, or pass --entropy-labels argmax")
    common.check_made_from(stage, "03_maps", "02_warmup")
    return common.stage_dir(args.work, "03_maps") / "labels"


def loud_warning(msg):
    bar = "!" * 78
    common.log0(f"{bar}\n{msg}\n{bar}", file=sys.stderr)
    warnings.warn(msg, stacklevel=2)


def main(argv=None):
    p = common.base_parser(__doc__)
    g = p.add_argument_group("target prototypes (Sec. 3.4, 4.2)")
    g.add_argument("--encoder", default="resnet152", choices=list(ENCODERS), metavar="NAME",
                   help="E-hat, the third-party encoder. The paper's (Sec. 4.2, and the official "
                        "code): simclr-r152-1x-sk1 with --encoder-weights r152_1x_sk1.pth (the "
                        "SimCLRv2 converter's file; README.md); any simclr-r{50,101,152}-{1,2}x-sk{0,1}. "
                        "torchvision: resnet152 (default), resnet50, resnet18 (small runs). "
                        "Features: layer4 output, 2048-d (512-d resnet18, 4096-d SimCLRv2 2x)")
    g.add_argument("--encoder-weights", default="imagenet",
                   help="imagenet (torchvision's supervised ImageNet weights, downloaded once; not "
                        "for simclr-*), none (random init: toy runs only, NOT the paper's setting), "
                        "or a file: the SimCLRv2 converter's r152_1x_sk1.pth for simclr-*, a "
                        "torchvision-layout state dict otherwise; loaded strictly")
    g.add_argument("--encoder-size", type=int, nargs=2, default=None, metavar=("W", "H"),
                   help="resize every image to W x H before E-hat. Default: 256 128 for simclr-* "
                        "(the official feature extractor; with its (1, 2) average pool this gives "
                        "4x4 features per image), the image's own size (times --encoder-scale) "
                        "for torchvision encoders")
    g.add_argument("--encoder-stride", type=int, default=32, choices=[32, 16],
                   help="output stride of E-hat: 32 (plain ResNet) or 16 (layer4 dilated: "
                        "4x the positions, a finer STM, 4x the distance maps)")
    g.add_argument("--encoder-scale", type=float, default=1.0,
                   help="resize images by this factor before E-hat (<1 saves time on the real "
                        "data; >1 gives the tiny toy images more than a few feature positions); "
                        "not used when an input size is set (--encoder-size, simclr-* encoders)")
    g.add_argument("--clusters", type=int, default=40,
                   help="J, the number of target prototypes (Sec. 3.4; the paper leaves J open, "
                        "the official code uses 40)")
    g.add_argument("--samples", type=int, default=1_000_000,
                   help="at most this many target feature vectors (uniform across images) for "
                        "K-means (float32: 8 GB at 1,000,000 x 2048 on the K-means process)")
    g.add_argument("--kmeans", default="minibatch", choices=["minibatch", "full"],
                   help="minibatch: scikit-learn MiniBatchKMeans (about 30 s on 1,000,000 x 2048); "
                        "full: Lloyd's KMeans (several minutes and 8-16 GB more at that size; the "
                        "centres differ little, and the STM only needs a nearest distance)")
    g = p.add_argument_group("class entropy (Eq. (8)) and STM (Eq. (9))")
    g.add_argument("--entropy-labels", default="auto", choices=["auto", "maps", "argmax"],
                   help="pixels are grouped per class by: maps = 03's MAPs pseudo labels (paper), "
                        "argmax = the warm-up prediction; auto = maps when 03_maps has finished")
    g.add_argument("--source-images", default="stylized", choices=["stylized", "raw"],
                   help="compute the STM on 01's GPA-stylized source (what 05 trains on) or the "
                        "raw source (the GPA ablation)")
    g.add_argument("--amp", default=True, action=argparse.BooleanOptionalAction,
                   help="fp16 autocast for the encoders on CUDA (ignored on CPU)")
    g.add_argument("--previews", type=int, default=6, help="heat-map previews to write")
    args = p.parse_args(argv)

    rank, world = common.setup_distributed(args.device)
    device = common.pick_device(args.device)
    common.seed_everything(args.seed)
    stage = common.Stage(args, "04_stm")
    items, image_for = common.stylized_source(args, stage, raw=args.source_images == "raw")
    warm = stage.use("02_warmup")
    if warm["args"]["source"] != args.source:
        raise common.StageError(f"{common.stage_dir(args.work, '02_warmup')} was trained on "
                                f"{warm['args']['source']} but --source is {args.source}")
    labels_dir = pseudo_labels_dir(args, stage)
    entropy_labels = "02_warmup argmax" if labels_dir is None else "03_maps pseudo labels"
    targets = common.target_train_items(args.data)
    classes = common.EVAL_CLASSES[common.SOURCE_EVAL_SETS[args.source][0]]
    resuming = stage.begin()
    if resuming:
        common.log0(f"resuming {stage.dir}: finished images are kept")
    if args.encoder_weights == "none":
        loud_warning("04_stm: --encoder-weights none: E-hat is a RANDOMLY INITIALISED network. The "
                     "target prototypes and the STM are then only a plumbing demo, NOT the paper's "
                     "setting (a SimCLRv2 ResNet-152, Sec. 4.2). Use imagenet or a weights file.")
    elif args.encoder_weights != "imagenet":
        stage.add_input(args.encoder_weights)
    stage.add_input(common.stage_dir(args.work, "02_warmup") / "model.pt")
    timings = {}

    # ============ step 1: target prototypes A_j (K-means on E-hat features) ============
    encoder = build_encoder(args.encoder, args.encoder_weights, args.encoder_stride,
                            args.encoder_size).to(device)
    input_spec = encoder.input_spec
    A, kinfo = prototypes_step(args, stage, encoder, targets, device, timings)

    # ============ step 2: class entropy e_c, e'_c (Eq. (8)) ============
    e, e_norm, e_pixels = entropy_step(args, stage, targets, labels_dir, device, classes, timings)

    # ============ step 3: distance maps (Eq. (7)) and d_mean ============
    t0 = time.time()
    d_mean, positions = distance_step(args, stage, encoder, A, items, image_for, device)
    timings["distance_s"] = round(time.time() - t0, 1)
    del encoder
    common.log0(f"d_mean = {d_mean:.4f} over {positions:,} source feature positions "
                f"(target to its own prototypes: {kinfo['target_mean_distance']:.4f})")

    # ============ step 4: transferability maps (Eq. (9)) ============
    t0 = time.time()
    acc = stm_step(args, stage, items, e_norm, d_mean, device)
    timings["stm_s"] = round(time.time() - t0, 1)
    common.barrier()

    # ============ previews and manifest (rank 0) ============
    if rank == 0:
        write_previews(args, stage, items, image_for, d_mean, args.previews)
        n = acc["n"]
        summary = {
            "J": args.clusters, "d_mean": d_mean, "source_positions": positions,
            "target_mean_distance": kinfo["target_mean_distance"], "kmeans": kinfo,
            "encoder": {"name": args.encoder, "weights": args.encoder_weights, "stride": args.encoder_stride,
                        "scale": args.encoder_scale, "dim": ENCODERS[args.encoder],
                        "input": {"pixels": input_spec["pixels"], "size": input_spec["size"],
                                  "pool": input_spec["pool"]}},
            "entropy_labels": entropy_labels, "entropy_classes": [common.CLASSES[c] for c in classes],
            "class_entropy": per_class(e), "class_entropy_norm": per_class(e_norm),
            "class_entropy_pixels": per_class(e_pixels),
            "stm_mean_per_class": per_class(acc["w"], n),
            "distance_term_mean_per_class": per_class(acc["dist"], n),
            "source_pixels_per_class": per_class(n),
            "stm_mean": float(acc["w"][:255].sum() / max(n[:255].sum(), 1)),
            "stm_mean_ignored": per_class(acc["w"], n, [255])["255"],
            "images": len(items), "resumed": resuming, "timings": timings,
        }
        stage.finish(summary, classes=list(common.CLASSES))
        print(stm_table(summary))
        print(f"04_stm: J = {args.clusters}, d_mean = {d_mean:.4f}, mean STM weight on labelled source "
              f"pixels {summary['stm_mean']:.3f} over {len(items)} images (Eq. (8) grouped by "
              f"{entropy_labels}) -> {stage.dir / 'stm'}")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)

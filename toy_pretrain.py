"""toy_pretrain.py: the toy data's stand-in for ImageNet weights (optional; CPU, ~10 minutes).

The paper's networks start from weights learnt on a third-party data set: the warm-up's
ResNet-101 from ImageNet (Sec. 4.2), 04's E-hat from SimCLRv2 on ImageNet, 06's student from
SimCLRv2 (Sec. 4.3). No such weights exist for the toy data, so by default the toy runs
start every network from random weights (README, "Does it adapt?"). This script makes a
toy counterpart: a resnet18 trained to classify object-centred crops, as ImageNet's
classifiers are, and writes its backbone as a torchvision-layout state dict that the
stages load like any pre-trained file:

    python toy_pretrain.py --out data/pretrained/toy_imagenet_resnet18.pth
    python 02_warmup.py ... --backbone resnet18 --weights data/pretrained/toy_imagenet_resnet18.pth
    python 04_stm.py ... --encoder resnet18 --encoder-weights data/pretrained/toy_imagenet_resnet18.pth
    python demo.py --pretrained        # the whole toy pipeline from this file

What it is trained on, and what it is not (so that it stands for ImageNet, not for the
target):
  - scenes: the toy SOURCE's scene generator (toy_data.layout / render with the source's
    content: none of the target's CONTENT_SHIFT), drawn from random streams of their own
    (no image of the toy data sets is used), each re-photographed by a random camera
    (channel mix, exposure, contrast curve, blur, noise): a look that is neither the
    source's nor the target's;
  - labels: one per crop, the kind of object it is centred on, and only kinds that
    ImageNet-1k has classes for: car, truck, bus, tram, person, rider, traffic light, sign
    and building facade (ImageNet: cab, trailer truck, trolleybus, streetcar, ...,
    traffic light, street sign, palace / church). No road, sidewalk, terrain, vegetation,
    sky, wall, fence or pole label: those are the segmentation's classes, which a
    classifier's pre-training does not see;
  - at 48x48 pixels, with random resized crops and flips and brightness / contrast jitter,
    as image classifiers are trained; SGD with Nesterov momentum under torch's one-cycle
    schedule (--schedule onecycle, the default). The schedule matters downstream, not
    only for the crop accuracy: the same crops under linear warm-up + cosine with a fixed
    momentum of 0.9 (--schedule cosine) end with early-layer weights about twice as
    large, and a warm-up from that file was no better than one from random weights
    (README, "A toy pre-training", has the measurements).
It is one file for every seed of the toy data (a fixed --seed, as ImageNet weights are
one file); its manifest (<out>.json) records its arguments, the held-out crop accuracy and
the environment. Rerunning with the same arguments keeps a finished file.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import common
import toy_data

KINDS = ("car", "truck", "bus", "train", "person", "rider", "light", "sign", "facade")
SIZE = 48        # crop side (pixels)


def camera(img, rng):
    """A third camera for a rendered uint8 image: a random channel mix (rows sum to 1),
    exposure and offset, a contrast curve (gamma 0.7-1.4), blur on half the images, sensor
    noise."""
    x = img.astype(np.float32)
    mix = np.eye(3, dtype=np.float32) * rng.uniform(0.6, 1.0) + rng.uniform(-0.2, 0.25, (3, 3)).astype(np.float32)
    x = x @ (mix / mix.sum(1, keepdims=True)).T
    x = x * rng.uniform(0.6, 1.3) + rng.uniform(-25, 25, 3)
    x = 255 * (np.clip(x, 0, 255) / 255) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.5:
        x = toy_data._blur(x, rng.uniform(0.3, 1.3))
    x = x + rng.normal(0, rng.uniform(0, 8), x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def crops(n_scenes, rng, size=(240, 132)):
    """Object-centred crops of n_scenes source-content scenes under random cameras:
    (N, SIZE, SIZE, 3) uint8 and (N,) int64 indices into KINDS. A crop is the object's box
    squared and widened by 1.1-1.5x (context, as in an ImageNet photo); for a facade, on 60%
    of them a square piece of 12-40 pixels (a few windows) instead of the whole block.
    Objects under 8 pixels across are skipped."""
    w, h = size
    xs, ys = [], []
    for _ in range(n_scenes):
        lab, parts = toy_data.layout(h, w, rng)
        img = Image.fromarray(camera(toy_data.render(lab, parts, rng, target=False), rng))
        for kind, y0, y1, x0, x1 in parts:
            if kind not in KINDS:
                continue
            if kind == "facade" and rng.random() < 0.6:
                s = int(min(y1 - y0, x1 - x0, rng.integers(12, 40)))
                y0 = int(rng.integers(y0, max(y0 + 1, y1 - s)))
                x0 = int(rng.integers(x0, max(x0 + 1, x1 - s)))
                y1, x1 = y0 + s, x0 + s
            cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
            r = max(y1 - y0, x1 - x0) * rng.uniform(1.1, 1.5) / 2
            if r < 4:
                continue
            box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
            xs.append(np.asarray(img.crop(box).resize((SIZE, SIZE), Image.BILINEAR)))
            ys.append(KINDS.index(kind))
    if not xs:
        raise ValueError(f"{n_scenes} scenes gave no object crop; use more --scenes")
    return np.stack(xs), np.array(ys, np.int64)


def augment(x, g):
    """Per crop: a random square crop of 30-48 pixels resized back to SIZE, a horizontal
    flip with p = 0.5, brightness x0.7-1.3 and an offset of +-20 (uint8 scale)."""
    out = torch.empty(len(x), 3, SIZE, SIZE)
    for b in range(len(x)):
        s = int(torch.randint(30, SIZE + 1, (1,), generator=g))
        oy, ox = (int(v) for v in torch.randint(0, SIZE + 1 - s, (2,), generator=g))
        c = F.interpolate(x[b:b + 1, :, oy:oy + s, ox:ox + s].float(), (SIZE, SIZE), mode="bilinear",
                          align_corners=False)[0]
        if torch.rand(1, generator=g) < 0.5:
            c = c.flip(2)
        out[b] = c * (0.7 + 0.6 * torch.rand(1, generator=g)) + 40 * (torch.rand(1, generator=g) - 0.5)
    return out.clamp(0, 255)


@torch.no_grad()
def accuracy(net, x, y, batch=256):
    net.eval()
    hits = sum(int((net(common.normalize(x[i:i + batch])).argmax(1) == y[i:i + batch]).sum())
               for i in range(0, len(y), batch))
    return 100.0 * hits / len(y)


def lr_schedule(opt, schedule, iters):
    """The learning-rate (and momentum) schedule of the pre-training, stepped once per
    iteration; the optimizer's lr is the peak."""
    lr = opt.param_groups[0]["lr"]
    if schedule == "onecycle":
        # torch's one-cycle policy: lr from lr/25 up to lr over the first 10% (cosine), then down
        # to lr/25e4; momentum cycled 0.95 -> 0.85 -> 0.95 against it
        # (the rise is at least 2 iterations: with exactly one, torch's OneCycleLR divides 0 by 0)
        return torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=iters,
                                                   pct_start=max(0.1, 2 / iters) if iters >= 4 else 0.1)
    if schedule == "cosine":
        # linear warm-up over 10% of the iterations, then cosine to 0; momentum as set (0.9)
        warm = max(1, iters // 10)
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: (i + 1) / warm if i < warm else 0.5 * (1 + np.cos(np.pi * (i + 1 - warm) / max(1, iters - warm))))
    raise ValueError(f"schedule must be 'onecycle' or 'cosine', got {schedule!r}")


def pretrain(scenes=3000, val_scenes=60, iters=1200, batch_size=96, lr=0.1, seed=0, log_every=100,
             schedule="onecycle"):
    """Train the classifier; returns (backbone state dict without fc, summary dict)."""
    torch.manual_seed(seed)
    t0 = time.time()
    x, y = crops(scenes, np.random.default_rng([seed, 1]))
    xv, yv = crops(val_scenes, np.random.default_rng([seed, 2]))
    x, xv = (torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in (x, xv))
    y, yv = torch.from_numpy(y), torch.from_numpy(yv)
    counts = dict(zip(KINDS, np.bincount(y.numpy(), minlength=len(KINDS)).tolist()))
    print(f"{len(y)} training crops from {scenes} scenes ({counts}), {len(yv)} held-out crops; "
          f"{time.time() - t0:.0f}s", flush=True)
    net = common.build_resnet("resnet18", "none", output_stride=32)
    net.fc = nn.Linear(net.fc.in_features, len(KINDS))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = lr_schedule(opt, schedule, iters)
    g = torch.Generator().manual_seed(seed)
    for it in range(1, iters + 1):
        net.train()
        idx = torch.randint(len(y), (batch_size,), generator=g)
        loss = F.cross_entropy(net(common.normalize(augment(x[idx], g))), y[idx])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"toy_pretrain: loss {loss.item()} at iteration {it}")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if it % log_every == 0 or it == iters:
            print(f"it {it}/{iters} loss {loss.item():.3f} held-out accuracy {accuracy(net, xv, yv):.1f}% "
                  f"{time.time() - t0:.0f}s", flush=True)
    summary = {"heldout_accuracy": accuracy(net, xv, yv), "chance": 100.0 * float(np.bincount(yv.numpy()).max()) / len(yv),
               "train_crops": counts, "heldout_crops": len(yv), "wall_time_s": time.time() - t0}
    return {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/pretrained/toy_imagenet_resnet18.pth",
                   help="the state dict to write (its manifest: the same path + .json)")
    p.add_argument("--scenes", type=int, default=3000, help="training scenes (about 14 crops each)")
    p.add_argument("--val-scenes", type=int, default=60, help="held-out scenes for the accuracy")
    p.add_argument("--iters", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=0.1, help="peak lr (SGD, Nesterov momentum, weight decay 5e-4)")
    p.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle",
                   help="cosine: linear warm-up over 10%% of --iters, then cosine to 0, momentum 0.9; onecycle: "
                        "torch's OneCycleLR (10%% up, lr/25 -> lr -> lr/25e4, momentum cycled 0.95-0.85)")
    p.add_argument("--seed", type=int, default=0, help="one fixed file for every seed of the toy data")
    a = p.parse_args(argv)
    for k in ("scenes", "val_scenes", "iters", "batch_size"):
        if getattr(a, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be at least 1, got {getattr(a, k)}")
    if not a.lr > 0:
        p.error(f"--lr must be positive, got {a.lr}")
    out = Path(a.out)
    meta = out.with_name(out.name + ".json")
    args = {k: v for k, v in vars(a).items() if k != "out"}
    if out.is_file() and meta.is_file():
        try:
            old = json.loads(meta.read_text())
        except ValueError:
            old = {}
        if old.get("args") == args:
            print(f"{out}: finished with these arguments ({old['summary']['heldout_accuracy']:.1f}% "
                  f"held-out accuracy); kept")
            return
    state, summary = pretrain(a.scenes, a.val_scenes, a.iters, a.batch_size, a.lr, a.seed,
                              schedule=a.schedule)
    # the file first, then its manifest: a manifest always describes the file beside it
    if meta.exists():
        meta.unlink()
    with common.atomic_write(out) as tmp:
        torch.save(state, tmp)
    common.save_json(meta, {"args": args, "summary": summary, "kinds": list(KINDS),
                            "layout": "torchvision resnet18 without fc", "code_revision": common.code_revision(),
                            "environment": common.environment("cpu")})
    print(f"wrote {out} (held-out accuracy {summary['heldout_accuracy']:.1f}%, chance "
          f"{summary['chance']:.1f}%) in {summary['wall_time_s']:.0f}s")


if __name__ == "__main__":
    main()

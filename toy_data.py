"""Toy datasets: a miniature GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes, written in
exactly the real on-disk formats, so every stage runs on a CPU in minutes.

    python toy_data.py --data data            # writes data/GTA5, data/SYNTHIA, data/cityscapes
    python toy_data.py --data data --scale 0.5 --count 0.5   # a smaller set (tests)

Scenes are procedural street layouts (sky, buildings, road, sidewalks, vegetation,
poles with lights and signs, people, riders, vehicles) holding all 19 Cityscapes
classes across the set. The domains differ the way synthetic and real images do:
the source is clean, saturated and sharp; the target has another palette, varying
illumination, blur, sensor noise and vehicles of any colour. SYNTHIA has no terrain,
truck or train, as the real SYNTHIA. Formats:
  GTA5/images/00001.png (RGB)         GTA5/labels/00001.png (8-bit palette PNG of labelIds)
  SYNTHIA/RAND_CITYSCAPES/RGB/0000001.png  GT/LABELS/0000001.png (16-bit 3-channel, id in R)
  cityscapes/leftImg8bit/{train,val}/<city>/<city>_000000_0000NN_leftImg8bit.png
  cityscapes/gtFine/{train,val}/<city>/<city>_000000_0000NN_gtFine_labelIds.png
As in the real GTA5, one image has no label and one label has the wrong size: the
readers skip both with a warning naming the file.
"""
import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

import common

# trainId -> ids stored in each dataset's label files
CS_ID = common.TRAIN_TO_CITYSCAPES_ID
SYN_ID = {t: s for s, t in common.SYNTHIA_ID_TO_TRAIN.items()}
R, SW, BLD, WALL, FENCE, POLE, LIGHT, SIGN, VEG, TERR, SKY, PERS, RIDER, CAR, TRUCK, BUS, \
    TRAIN, MOTO, BIKE = range(19)


# ============ scene layout: a trainId label map ============
def layout(h, w, rng, synthia=False):
    """Draw one street scene as an (h, w) trainId map. 255 marks 'void' pixels."""
    lab = np.full((h, w), SKY, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    hor = int(h * rng.uniform(0.30, 0.42) if not synthia else h * rng.uniform(0.20, 0.32))
    # buildings: blocks of random heights standing on the horizon
    x = 0
    while x < w:
        bw = int(rng.integers(w // 10, w // 4))
        top = int(rng.integers(max(1, hor - h // 3), max(2, hor - 2)))
        lab[top:hor + h // 10, x:x + bw] = BLD
        x += bw + int(rng.integers(0, w // 12))
    # vegetation: tree crowns (ellipses) above the horizon
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.integers(0, w), rng.integers(hor - h // 6, hor + 1)
        rx, ry = rng.integers(w // 20, w // 7), rng.integers(h // 12, h // 5)
        lab[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1] = VEG
    # ground: road in the middle, sidewalks, terrain at the far sides
    gy = hor + h // 10
    t = np.clip((yy - gy) / max(1, h - gy), 0, 1)                # 0 at the far end, 1 at the bottom
    half = w * (0.08 + 0.42 * t)                                # road half-width grows downwards
    cx = w / 2 + rng.uniform(-0.1, 0.1) * w
    ground = yy >= gy
    d = np.abs(xx - cx)
    lab[ground] = SW
    lab[ground & (d < half)] = R
    if not synthia and rng.random() < 0.7:
        lab[ground & (d > half * 1.6)] = TERR
    elif rng.random() < 0.5:
        lab[ground & (d > half * 1.8)] = VEG
    # wall and fence: low bands in front of the buildings
    if rng.random() < 0.6:
        x0 = int(rng.integers(0, w // 2)); x1 = x0 + int(rng.integers(w // 6, w // 3))
        lab[gy - h // 12:gy, x0:x1] = WALL
    if rng.random() < 0.6:
        x0 = int(rng.integers(w // 2, w)); x1 = x0 + int(rng.integers(w // 6, w // 3))
        band = (yy >= gy - h // 14) & (yy < gy) & (xx >= x0) & (xx < x1) & ((xx // 2) % 2 == 0)
        lab[band] = FENCE
    # poles with traffic lights and signs
    for _ in range(rng.integers(1, 4)):
        px = int(rng.integers(2, w - 3)); ptop = int(rng.integers(h // 8, hor))
        pb = int(rng.integers(gy, min(h, gy + h // 5)))
        lab[ptop:pb, px:px + max(1, w // 120)] = POLE
        if rng.random() < 0.5:
            lab[ptop:ptop + h // 14, px - w // 80:px + w // 80 + 1] = LIGHT
        else:
            s = h // 16
            lab[ptop + 2:ptop + 2 + s, px - s // 2:px + s // 2 + 1] = SIGN
    # train on the far road (GTA5 and Cityscapes only)
    if not synthia and rng.random() < 0.15:
        x0 = int(rng.integers(0, w // 2))
        lab[gy - h // 8:gy + h // 14, x0:x0 + w // 2] = TRAIN
    # vehicles on the road, bigger further down
    kinds = [CAR, CAR, CAR, BUS] + ([] if synthia else [TRUCK, TRUCK])
    for _ in range(rng.integers(1, 5)):
        k = kinds[rng.integers(len(kinds))]
        vy = int(rng.integers(gy + 2, h - 2))
        sz = 0.3 + 0.9 * (vy - gy) / max(1, h - gy)
        vw = int(w * {CAR: 0.10, TRUCK: 0.13, BUS: 0.18}[k] * sz) + 3
        vh = int(h * {CAR: 0.07, TRUCK: 0.14, BUS: 0.13}[k] * sz) + 3
        vx = int(cx + rng.uniform(-0.8, 0.8) * np.interp(vy, [gy, h], [w * 0.08, w * 0.5]))
        y0, x0 = max(0, vy - vh), max(0, vx - vw // 2)
        lab[y0:vy, x0:vx + vw // 2] = k
        if k == CAR:  # a rounded roof
            lab[max(0, y0 - vh // 3):y0, x0 + vw // 5:vx + vw // 4] = k
    # people on the sidewalks, riders on two-wheelers
    for _ in range(rng.integers(1, 5)):
        py = int(rng.integers(gy + 2, h - 1))
        sz = 0.4 + 0.8 * (py - gy) / max(1, h - gy)
        ph, pw = int(h * 0.16 * sz) + 3, int(w * 0.018 * sz) + 2
        side = rng.choice([-1, 1])
        px = int(np.clip(cx + side * np.interp(py, [gy, h], [w * 0.1, w * 0.55]), 2, w - 3))
        if rng.random() < 0.35:  # rider on a bicycle or motorcycle
            wheel = MOTO if rng.random() < 0.5 else BIKE
            lab[py - ph // 3:py, px - 2 * pw:px + 2 * pw] = wheel
            lab[py - ph:py - ph // 3, px - pw // 2:px + pw // 2 + 1] = RIDER
            lab[py - ph - pw:py - ph, px - pw // 3:px + pw // 3 + 1] = RIDER
        else:
            lab[max(0, py - ph):py, px - pw // 2:px + pw // 2 + 1] = PERS
            lab[max(0, py - ph - pw):max(0, py - ph), px - pw // 3:px + pw // 3 + 1] = PERS
    # a few void pixels (the real labels have unlabelled regions)
    if rng.random() < 0.3:
        lab[h - h // 20:, : w // 6] = 255
    return lab


# ============ appearance: colour, texture, and the domain shift ============
BASE = np.array([  # a 'rendered' colour per class, not the evaluation palette
    (110, 100, 115), (190, 150, 190), (140, 110, 90), (160, 160, 130), (150, 120, 100),
    (170, 170, 170), (230, 180, 40), (230, 230, 40), (60, 140, 40), (150, 200, 100),
    (110, 170, 235), (220, 40, 60), (250, 90, 40), (40, 40, 180), (30, 70, 90),
    (40, 110, 150), (90, 110, 120), (120, 40, 200), (160, 30, 70)], np.float32)
TEXTURE = np.array([2, 10, 14, 8, 12, 4, 3, 3, 22, 16, 2, 6, 6, 5, 6, 6, 8, 7, 7], np.float32)


def render(lab, rng, target):
    """Paint a label map. target=False: clean synthetic look; True: the 'real' camera."""
    h, w = lab.shape
    cls = np.where(lab == 255, 2, lab)
    col = BASE.copy()
    if target:
        # another palette: a channel mix (warmer, less saturated), vegetation yellower,
        # sky greyer; vehicles take any colour, so colour alone no longer names them
        mix = np.array([[0.75, 0.20, 0.05], [0.10, 0.75, 0.15], [0.05, 0.25, 0.70]], np.float32)
        col = col @ mix.T * 0.85 + 20
        col[VEG] = (95, 125, 60); col[SKY] = (170, 185, 200); col[R] = (95, 92, 90)
    img = col[cls] + rng.normal(0, 6, 3).astype(np.float32)     # per-image tint
    if target:
        for k in (CAR, TRUCK, BUS):
            m = lab == k
            if m.any():
                img[m] = rng.uniform(30, 220, 3)
    # per-class texture: stripes and grain of class-specific strength
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin(xx * 0.9 + yy * 0.4) * np.sin(yy * 0.7)
    grain = rng.normal(0, 1, (h, w)).astype(np.float32)
    img += (TEXTURE[cls] * (0.6 * stripes + 0.4 * grain))[..., None]
    if target:
        # illumination: a vertical gradient and a per-image exposure
        gain = rng.uniform(0.65, 1.15) * (1 - 0.25 * rng.random() * (yy / h))
        img *= gain[..., None]
        img = _blur(img, rng.uniform(0.6, 1.2))
        img += rng.normal(0, 7, img.shape)
    return img.clip(0, 255).astype(np.uint8)



def _blur(img, sigma):
    """Separable Gaussian blur (numpy only)."""
    r = max(1, int(2 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    out = sum(k[i] * pad[:, i:i + img.shape[1]] for i in range(2 * r + 1))
    return sum(k[i] * out[i:i + img.shape[0]] for i in range(2 * r + 1))


# ============ writers in the real formats ============
def gta5_palette():
    pal = np.zeros((256, 3), np.uint8)
    for t, i in CS_ID.items():
        pal[i] = common.PALETTE[t]
    return pal.flatten().tolist()


def write_gta5(root, n, size, rng):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    lut = np.zeros(256, np.uint8)
    for t, i in CS_ID.items():
        lut[t] = i
    for k in range(1, n + 1):
        w, h = size
        lab = layout(h, w, rng)
        img = render(lab, rng, target=False)
        name = f"{k:05d}.png"
        Image.fromarray(img).save(root / "images" / name)
        if k == n:        # like the real GTA5: a label is missing
            continue
        ids = Image.fromarray(lut[lab]).convert("P")
        if k == n - 1:    # and a label whose size differs from its image
            ids = ids.resize((w - 2, h), Image.NEAREST)
        ids.putpalette(gta5_palette())
        ids.save(root / "labels" / name)


def write_synthia(root, n, size, rng):
    import cv2
    (root / "RGB").mkdir(parents=True, exist_ok=True)
    (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    lut = np.zeros(256, np.uint16)
    for t, s in SYN_ID.items():
        lut[t] = s
    for k in range(1, n + 1):
        w, h = size
        lab = layout(h, w, rng, synthia=True)
        img = render(lab, rng, target=False)
        img = (img.astype(np.float32) * 0.9 + 15).astype(np.uint8)  # SYNTHIA renders flatter
        name = f"{k:07d}.png"
        Image.fromarray(img).save(root / "RGB" / name)
        ids = lut[lab]
        ids[lab == 255] = 0                      # 0 = void in SYNTHIA
        inst = (rng.integers(0, 3000, lab.shape)).astype(np.uint16)
        # 16-bit, 3 channels: class id in R, instance id in G; OpenCV writes BGR
        cv2.imwrite(str(root / "GT" / "LABELS" / name), np.stack([np.zeros_like(ids), inst, ids], -1))


def write_cityscapes(root, split, cities, per_city, size, rng):
    lut = np.zeros(256, np.uint8)
    for t, i in CS_ID.items():
        lut[t] = i
    for city in cities:
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        for k in range(per_city):
            w, h = size
            lab = layout(h, w, rng)
            img = render(lab, rng, target=True)
            stem = f"{city}_000000_{k:06d}"
            Image.fromarray(img).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            ids = lut[lab]
            ids[lab == 255] = 0                  # 0 = unlabeled
            Image.fromarray(ids).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="image size factor (1.0: target 256x128)")
    p.add_argument("--count", type=float, default=1.0, help="image count factor")
    a = p.parse_args(argv)
    t0 = time.time()
    data = Path(a.data)
    rng = np.random.default_rng(a.seed)

    def sz(w, h):
        return (max(32, int(round(w * a.scale / 8)) * 8), max(16, int(round(h * a.scale / 4)) * 4))

    def cnt(n):
        return max(4, int(round(n * a.count)))
    write_gta5(data / "GTA5", cnt(48), sz(240, 132), rng)
    write_synthia(data / "SYNTHIA" / "RAND_CITYSCAPES", cnt(40), sz(224, 132), rng)
    write_cityscapes(data / "cityscapes", "train", ["aachen", "bochum", "zurich"], cnt(14), sz(256, 128), rng)
    write_cityscapes(data / "cityscapes", "val", ["frankfurt", "lindau"], cnt(6), sz(256, 128), rng)
    print(f"toy datasets written to {data}/ (GTA5, SYNTHIA/RAND_CITYSCAPES, cityscapes) "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

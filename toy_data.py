"""Toy datasets: a miniature GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes, written in
exactly the real on-disk formats, so every stage runs on a CPU in minutes.

    python toy_data.py --data data            # writes data/GTA5, data/SYNTHIA, data/cityscapes
    python toy_data.py --data data --scale 0.5 --count 0.5   # a smaller set (tests)
    python toy_data.py --data data --source-factor 8   # 8x the source images (GTA5 / Cityscapes
                                                       # train is 8.4x in the real data)

Scenes are procedural street layouts in perspective (sky with clouds, buildings with
window grids, a road with lane marks, tiled sidewalks, trees and grass, fences and
walls, poles with three-lamp traffic lights and round, triangular or square signs,
people with heads, clothes and legs, riders on two-wheelers, cars with cabins, windows
and wheels, trucks, buses and trams with window rows), holding all 19 Cityscapes classes
across the set. Objects vary in size with their distance and occlude each other far to
near, so a network has to learn shapes and textures, not only colours. Vehicles take
any paint colour in every domain, as in GTA5 and Cityscapes alike, so that a vehicle's
colour never names its class. The domains differ the way GTA5 and Cityscapes do, in two
ways (README, "Toy data"):
  - photometry: the source is clean, saturated and sharp; the target has another palette,
    varying exposure and illumination, blur and sensor noise (what GPA and batch-norm
    statistics can undo);
  - content (CONTENT_SHIFT below): the target's streets are another city's, with grey
    concrete sidewalks in large slabs, facades of plaster and stone in several colours with
    tall narrow windows, other foliage and grass, other vehicle models (shorter, taller
    cars, box trucks, longer buses) mostly painted grey, black or white, darker clothes,
    white sign faces, a steadier camera height, less open terrain and more parked cars and
    pedestrians. No global colour transform undoes these: a source-trained model misreads
    whole classes of the target (sidewalk as road, above all), as GTA5 models do on
    Cityscapes, while a model trained on the target's labels does not (the bench's oracle).
SYNTHIA has no terrain, truck or train, as the real SYNTHIA. GTA5 and SYNTHIA are the
same with or without the content shift: it changes only the target. Formats:
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


# ============ scene layout: a trainId label map and the parts to paint ============
def _ellipse(lab, yy, xx, cy, cx, ry, rx, k):
    """Fill an axis-aligned ellipse with class k (only its bounding box is computed)."""
    ry, rx = max(ry, 0.5), max(rx, 0.5)
    y0, y1 = max(0, int(cy - ry)), max(0, int(cy + ry) + 1)
    x0, x1 = max(0, int(cx - rx)), max(0, int(cx + rx) + 1)
    box = (slice(y0, y1), slice(x0, x1))
    lab[box][((yy[box] - cy) / ry) ** 2 + ((xx[box] - cx) / rx) ** 2 < 1] = k


def layout(h, w, rng, synthia=False, real=False):
    """Draw one street scene as an (h, w) trainId map (255 marks 'void' pixels) and the
    parts that render() details: [(kind, y0, y1, x0, x1), ...]. Objects are drawn far to
    near, so nearer ones occlude; their size follows the perspective of the road.
    real=True: the target's scenes (CONTENT_SHIFT: a steadier camera height, less terrain,
    more parked cars and pedestrians, other vehicle proportions)."""
    lab = np.full((h, w), SKY, np.uint8)
    parts = []
    yy, xx = np.mgrid[0:h, 0:w]
    hor = int(h * (rng.uniform(0.34, 0.42) if real else rng.uniform(0.30, 0.42) if not synthia
                   else rng.uniform(0.20, 0.32)))
    gy = hor + h // 10                                           # where the ground starts
    # buildings: blocks of random widths and heights (a few towers) standing on the ground
    x = int(rng.integers(-w // 10, 1))
    while x < w:
        bw = int(rng.integers(w // 12, w // 4))
        tall = rng.random() < 0.2
        top = int(rng.integers(1, max(2, hor // 3))) if tall else \
            int(rng.integers(max(1, hor - h // 3), max(2, hor - 2)))
        x0, x1 = max(0, x), min(w, x + bw)
        if x1 > x0:
            lab[top:gy, x0:x1] = BLD
            parts.append(("facade", top, gy, x0, x1))
        x += bw + int(rng.integers(0, w // 12))
    # vegetation: tree crowns (clusters of ellipses) with trunks, and hedges
    for _ in range(rng.integers(1, 5)):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(hor - h // 6, hor + h // 12))
        rx, ry = int(rng.integers(w // 25, w // 8)), int(rng.integers(h // 14, h // 5))
        lab[cy:gy + h // 20, max(0, cx - 1):cx + 2] = VEG                 # the trunk
        for _ in range(rng.integers(2, 5)):
            _ellipse(lab, yy, xx, cy + rng.integers(-ry // 2, ry // 2 + 1),
                     cx + rng.integers(-rx // 2, rx // 2 + 1), ry * rng.uniform(0.6, 1.0),
                     rx * rng.uniform(0.6, 1.0), VEG)
    # ground: road in the middle, sidewalks, terrain or hedges at the far sides
    t = np.clip((yy - gy) / max(1, h - gy), 0, 1)                # 0 at the far end, 1 at the bottom
    half = w * (0.08 + 0.42 * t)                                 # road half-width grows downwards
    cx = w / 2 + rng.uniform(-0.12, 0.12) * w
    ground = yy >= gy
    d = np.abs(xx - cx)
    lab[ground] = SW
    lab[ground & (d < half)] = R
    parts.append(("road", gy, h, int(cx), int(cx) + 1))
    if not synthia and rng.random() < (0.35 if real else 0.7):
        lab[ground & (d > half * rng.uniform(1.4, 1.9))] = TERR
    elif rng.random() < 0.5:
        lab[ground & (d > half * 1.8)] = VEG
    # wall and fence: low bands in front of the buildings
    if rng.random() < 0.6:
        x0 = int(rng.integers(0, w // 2)); x1 = x0 + int(rng.integers(w // 6, w // 3))
        lab[gy - int(h * rng.uniform(0.05, 0.12)):gy, x0:x1] = WALL
    if rng.random() < 0.6:
        x0 = int(rng.integers(w // 3, w)); x1 = x0 + int(rng.integers(w // 6, w // 3))
        fh = int(h * rng.uniform(0.05, 0.09))
        band = (yy >= gy - fh) & (yy < gy) & (xx >= x0) & (xx < x1) & \
            (((xx // 2) % 3 == 0) | (yy == gy - fh) | (yy == gy - fh // 2))
        lab[band] = FENCE
    # train on the far road (GTA5 and Cityscapes only)
    if not synthia and rng.random() < 0.2:
        x0 = int(rng.integers(-w // 4, w // 2)); th = int(h * rng.uniform(0.10, 0.16))
        lab[gy - th:gy + h // 20, max(0, x0):x0 + w // 2] = TRAIN
        parts.append(("train", gy - th, gy + h // 20, max(0, x0), min(w, x0 + w // 2)))
    # poles with traffic lights and signs (round, triangular or square)
    for _ in range(rng.integers(1, 5)):
        px = int(rng.integers(2, w - 3)); ptop = int(rng.integers(h // 10, hor))
        pb = int(rng.integers(gy, min(h, gy + h // 4)))
        pw = max(2, int(w * rng.uniform(0.012, 0.022)))
        lab[ptop:pb, px:px + pw] = POLE
        s = int(h * rng.uniform(0.06, 0.10)) + 3
        if rng.random() < 0.5:
            lab[ptop:ptop + 2 * s, px - s // 3:px + s // 3 + pw] = LIGHT
            parts.append(("light", ptop, ptop + 2 * s, px - s // 3, px + s // 3 + pw))
        else:
            sy, sx = ptop + s // 2 + 1, px + pw // 2
            shape = rng.integers(3)
            if shape == 0:
                _ellipse(lab, yy, xx, sy, sx, s / 2, s / 2, SIGN)
            elif shape == 1:
                lab[(yy >= sy - s // 2) & (yy <= sy + s // 2)
                    & (np.abs(xx - sx) <= (yy - sy + s // 2) / 2 + 0.5)] = SIGN
            else:
                lab[sy - s // 2:sy + s // 2 + 1, sx - s // 2:sx + s // 2 + 1] = SIGN
            parts.append(("sign", sy - s // 2, sy + s // 2 + 1, sx - s // 2, sx + s // 2 + 1))
    # road users, far to near: vehicles on the road, people and riders on the sidewalks
    kinds = [CAR, CAR, CAR, BUS] + ([] if synthia else [TRUCK, TRUCK]) + ([CAR, CAR] if real else [])
    crowd = 8 if real else 6  # city streets: more parked cars and pedestrians
    users = [("veh", int(rng.integers(gy + 2, h + h // 8))) for _ in range(rng.integers(1, crowd))]
    users += [("ped", int(rng.integers(gy + 2, h + h // 10))) for _ in range(rng.integers(1, crowd))]
    for kind, vy in sorted(users, key=lambda u: u[1]):
        sz = (0.4 + 1.0 * (vy - gy) / max(1, h - gy)) * rng.uniform(0.8, 1.25)
        if kind == "veh":
            k = kinds[rng.integers(len(kinds))]
            # the target's vehicles are other models: shorter, taller cars (hatchbacks), box
            # trucks, longer buses
            vw = int(w * ({CAR: 0.09, TRUCK: 0.12, BUS: 0.24} if real else
                          {CAR: 0.11, TRUCK: 0.14, BUS: 0.2})[k] * sz) + 3
            vh = int(h * ({CAR: 0.09, TRUCK: 0.17, BUS: 0.14} if real else
                          {CAR: 0.08, TRUCK: 0.15, BUS: 0.15})[k] * sz) + 3
            vx = int(cx + rng.uniform(-0.9, 0.9) * np.interp(vy, [gy, h], [w * 0.08, w * 0.5]))
            y0, x0, x1 = max(0, vy - vh), max(0, vx - vw // 2), min(w, vx + vw // 2)
            lab[y0:vy, x0:x1] = k
            if k == CAR:  # the cabin, narrower than the body (a hatchback's reaches the back)
                ry0 = max(0, y0 - (vh * 2) // 3 if real else y0 - vh // 2)
                c0, c1 = (x0 + vw // 10, x1 - vw // 4) if real else (x0 + vw // 6, x1 - vw // 6)
                lab[ry0:y0, c0:max(c0 + 1, c1)] = k
                y0 = ry0
            parts.append(({CAR: "car", TRUCK: "truck", BUS: "bus"}[k], y0, vy, x0, x1))
        else:
            ph, pw = int(h * 0.22 * sz) + 5, int(w * 0.026 * sz) + 3
            side = rng.choice([-1, 1])
            px = int(np.clip(cx + side * np.interp(vy, [gy, h], [w * 0.1, w * 0.55])
                             + rng.uniform(-0.05, 0.05) * w, 2, w - 3))
            if rng.random() < 0.35:  # a rider on a bicycle or motorcycle
                wheel = MOTO if rng.random() < 0.5 else BIKE
                r = max(1, ph // 6)
                for wx in (px - 2 * pw, px + 2 * pw):
                    _ellipse(lab, yy, xx, vy - r, wx, r, r, wheel)
                lab[vy - 2 * r - max(1, r // 2):vy - r, px - 2 * pw:px + 2 * pw] = wheel  # frame
                lab[vy - ph:vy - 2 * r, px - pw // 2:px + pw // 2 + 1] = RIDER
                _ellipse(lab, yy, xx, vy - ph - pw // 2, px, pw / 2 + 0.5, pw / 2 + 0.5, RIDER)
                parts.append(("rider", vy - ph - pw, vy - 2 * r, px - pw // 2, px + pw // 2 + 1))
                parts.append(("wheels", vy - 2 * r, vy, px - 2 * pw - r, px + 2 * pw + r))
            else:
                lab[max(0, vy - ph):vy - ph // 2, px - pw // 2:px + pw // 2 + 1] = PERS   # torso
                leg = max(1, pw // 3)
                lab[vy - ph // 2:vy, px - pw // 2:px - pw // 2 + leg] = PERS              # legs
                lab[vy - ph // 2:vy, px + pw // 2 + 1 - leg:px + pw // 2 + 1] = PERS
                _ellipse(lab, yy, xx, vy - ph - pw // 2, px, pw / 2 + 0.5, pw / 2 + 0.5, PERS)
                parts.append(("person", vy - ph - pw, vy, px - pw // 2, px + pw // 2 + 1))
    # a few void pixels (the real labels have unlabelled regions, e.g. the ego car)
    if rng.random() < 0.3:
        lab[h - h // 20:, : w // 6] = 255
    return lab, parts


# ============ appearance: colour, texture, shading, and the domain shift ============
BASE = np.array([  # a 'rendered' colour per class, not the evaluation palette
    (110, 100, 115), (190, 150, 190), (140, 110, 90), (160, 160, 130), (150, 120, 100),
    (170, 170, 170), (60, 60, 60), (230, 230, 40), (60, 140, 40), (150, 200, 100),
    (110, 170, 235), (220, 40, 60), (250, 90, 40), (40, 40, 180), (30, 70, 90),
    (40, 110, 150), (90, 110, 120), (120, 40, 200), (160, 30, 70)], np.float32)
# CONTENT_SHIFT: facade materials of the target's buildings (plaster, sandstone, brick, concrete)
FACADES = np.array([(175, 165, 145), (140, 138, 135), (165, 135, 95), (190, 186, 176), (125, 92, 78)], np.float32)
GRAIN = np.array([3, 6, 8, 8, 6, 3, 2, 2, 10, 12, 2, 4, 4, 4, 4, 4, 4, 4, 4], np.float32)


def _smooth_noise(h, w, cell, rng):
    """Value noise: a coarse random grid, bilinearly upsampled (values about N(0, 1))."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    g = Image.fromarray(rng.normal(0, 1, (gh, gw)).astype(np.float32), mode="F")
    return np.asarray(g.resize((w, h), Image.BILINEAR), np.float32)


def render(lab, parts, rng, target):
    """Paint a label map. target=False: clean synthetic look; True: the 'real' camera.
    Classes carry texture and structure (windows, lane marks, tiles, foliage, wheels,
    faces), not only a colour, so a network can tell them apart by shape."""
    h, w = lab.shape
    cls = np.where(lab == 255, 2, lab)
    col = BASE.copy()
    if target:
        # another palette: a channel mix (warmer, less saturated), vegetation yellower,
        # sky greyer
        mix = np.array([[0.75, 0.20, 0.05], [0.10, 0.75, 0.15], [0.05, 0.25, 0.70]], np.float32)
        col = col @ mix.T * 0.85 + 20
        col[VEG] = (95, 125, 60); col[SKY] = (170, 185, 200); col[R] = (95, 92, 90)
        # CONTENT_SHIFT: grey concrete sidewalks (GTA5's are not; in Cityscapes road and
        # sidewalk differ little in colour), trodden grass
        col[SW] = (122, 118, 112); col[TERR] = (125, 130, 80)
    img = col[cls] + rng.normal(0, 6, 3).astype(np.float32)     # per-image tint
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # stuff textures: foliage blobs, grass, clouds, asphalt and facade weathering
    foliage = _smooth_noise(h, w, 5, rng) * 1.4 if target else _smooth_noise(h, w, 3, rng)
    img[lab == VEG] += (18 * foliage)[lab == VEG][:, None]
    img[lab == TERR] += (10 * _smooth_noise(h, w, 2, rng))[lab == TERR][:, None]
    sky = lab == SKY
    img[sky] += (25 * np.clip(_smooth_noise(h, w, 12, rng), 0, None) - 20 * (yy / h))[sky][:, None]
    img += (GRAIN[cls] * rng.normal(0, 1, (h, w)).astype(np.float32))[..., None]
    for kind, y0, y1, x0, x1 in parts:
        bh, bw = max(1, y1 - y0), max(1, x1 - x0)
        box = (slice(max(0, y0), max(0, y1)), slice(max(0, x0), max(0, x1)))
        sub, m = img[box], lab[box]
        by, bx = yy[box] - y0, xx[box] - x0
        if kind == "facade":  # a window grid, darker lower floors, a lit or dark window
            fy, fx = max(4, int(rng.integers(5, 9))), max(4, int(rng.integers(5, 10)))
            win = ((by % fy) >= fy // 3) & ((bx % fx) >= fx // 3) & (by > 2) & (bx > 1) & (bx < bw - 2)
            if target:  # CONTENT_SHIFT: plaster and stone in several colours, tall narrow windows
                # (replaces the grid above, whose draws stay in the random stream the README's
                # figures were measured with)
                n = int((m == BLD).sum())
                sub[m == BLD] = FACADES[rng.integers(len(FACADES))] + GRAIN[BLD] * rng.normal(0, 1, (n, 1))
                fy, fx = int(rng.integers(8, 13)), int(rng.integers(6, 10))
                win = ((by % fy) >= fy // 4) & ((bx % fx) >= fx // 2) & (by > 2) & (bx > 1) & (bx < bw - 2)
            shade = rng.uniform(0.35, 0.6)
            sel = win & (m == BLD)
            sub[sel] = sub[sel] * shade + (rng.uniform(0, 60) if target else 25)
            sub[m == BLD] *= (1 - 0.15 * (bx[m == BLD] / bw))[:, None]  # side light
        elif kind == "road":  # a dashed centre line and a lane edge, in perspective
            cx0 = x0
            dash = ((yy[box] // 5) % 2 == 0)
            line = (np.abs(xx[box] - cx0) <= 0.5 + 0.012 * (yy[box] - y0)) & dash & (m == R)
            sub[line] = (225, 225, 210)
            if target:  # CONTENT_SHIFT: large concrete slabs
                tiles = (m == SW) & (((yy[box] + 1) % 9 == 0) | ((xx[box] % 13) == 0))
                sub[tiles] *= 0.88
            else:
                tiles = (m == SW) & (((yy[box] + 1) % 6 == 0) | (((xx[box] + yy[box] // 6 * 3) % 9) == 0))
                sub[tiles] *= 0.8
        elif kind in ("car", "truck", "bus", "train"):
            k = {"car": CAR, "truck": TRUCK, "bus": BUS, "train": TRAIN}[kind]
            body = m == k
            # paint: any colour, in both domains (a class colour would be a cue that only
            # the source has: a source-trained model would read the class off the paint)
            paint = rng.uniform(30, 220, 3)
            if target and rng.random() < 0.6:  # CONTENT_SHIFT: most of a city's cars are grey, black or white
                paint = np.full(3, rng.uniform(30, 220))
            sub[body] = paint + 6 * rng.normal(0, 1, (int(body.sum()), 3))
            glass = (30, 40, 55) if not target else (45, 50, 55)
            if kind == "car":   # windows in the cabin (upper third), wheels at the bottom
                sub[body & (by < bh * 0.33) & (bx > bw * 0.25) & (bx < bw * 0.75)] = glass
            elif kind in ("bus", "train"):  # a row of windows and a stripe
                sub[body & (by > bh * 0.2) & (by < bh * 0.5) & ((bx % 7) > 1)] = glass
                sub[body & (by > bh * 0.65) & (by < bh * 0.72)] *= 0.6
            else:               # truck: a windscreen on one side of the cab
                sub[body & (by < bh * 0.3) & (bx > bw * 0.7)] = glass
            if kind != "train":
                r = max(1, bh // 5)
                for wx in (bw * 0.2, bw * 0.8):
                    sub[body & ((by - (bh - r)) ** 2 + (bx - wx) ** 2 <= r * r)] = (20, 20, 22)
        elif kind in ("person", "rider"):
            k = PERS if kind == "person" else RIDER
            body = m == k
            sub[body & (by >= bh * 0.2)] = rng.uniform(30, 140 if target else 230, 3)  # clothes (darker in the target)
            sub[body & (by >= bh * 0.6)] = rng.uniform(20, 90, 3)           # trousers, darker
            sub[body & (by < bh * 0.2)] = (200, 160, 130) if not target else (190, 160, 140)
            if kind == "rider":   # a helmet-like top, in the class colour
                sub[body & (by < bh * 0.1)] = col[RIDER]
        elif kind == "wheels":
            for k in (MOTO, BIKE):
                sel = m == k
                sub[sel] = sub[sel] * 0.5 + 10
        elif kind == "light":  # three lamps in a dark box
            for q, lamp in enumerate(((220, 40, 30), (230, 170, 20), (40, 200, 60))):
                sel = (m == LIGHT) & (by >= bh * q / 3 + 1) & (by < bh * (q + 1) / 3 - 1) & \
                    (np.abs(bx - bw / 2) < bw / 4 + 0.5)
                sub[sel] = lamp if (q == rng.integers(3)) else np.array(lamp) * 0.35
        elif kind == "sign":  # a white border and a coloured face
            face = rng.choice([0, 1, 2])
            sel = m == SIGN
            sub[sel] = (((230, 230, 230), (200, 40, 40), (40, 80, 200)) if target else  # CONTENT_SHIFT
                        ((230, 230, 40), (200, 40, 40), (40, 80, 200)))[face]
            edge = sel & ((by < 1) | (by >= bh - 1) | (bx < 1) | (bx >= bw - 1))
            sub[edge] = (235, 235, 235)
        img[box] = sub
    # shading: the scene is lit from above; shadows under vehicles on the road
    img *= (1.05 - 0.15 * (yy / h))[..., None]
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


def write_gta5(root, n, size, rng, first=1, quirks=True):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    lut = np.zeros(256, np.uint8)
    for t, i in CS_ID.items():
        lut[t] = i
    last = first + n - 1
    for k in range(first, last + 1):
        w, h = size
        lab, parts = layout(h, w, rng)
        img = render(lab, parts, rng, target=False)
        name = f"{k:05d}.png"
        Image.fromarray(img).save(root / "images" / name)
        if quirks and k == last:        # like the real GTA5: a label is missing
            continue
        ids = Image.fromarray(lut[lab]).convert("P")
        if quirks and k == last - 1:    # and a label whose size differs from its image
            ids = ids.resize((w - 2, h), Image.NEAREST)
        ids.putpalette(gta5_palette())
        ids.save(root / "labels" / name)


def write_synthia(root, n, size, rng, first=1):
    import cv2
    (root / "RGB").mkdir(parents=True, exist_ok=True)
    (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    lut = np.zeros(256, np.uint16)
    for t, s in SYN_ID.items():
        lut[t] = s
    for k in range(first, first + n):
        w, h = size
        lab, parts = layout(h, w, rng, synthia=True)
        img = render(lab, parts, rng, target=False)
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
            lab, parts = layout(h, w, rng, real=True)
            img = render(lab, parts, rng, target=True)
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
    p.add_argument("--source-factor", type=float, default=1.0,
                   help="GTA5 and SYNTHIA get this many times their images (>= 1). The images "
                        "beyond the usual ones come from their own random streams, so the "
                        "target sets and the usual source images stay byte-identical")
    a = p.parse_args(argv)
    if not a.source_factor >= 1:
        p.error(f"--source-factor must be a number >= 1, got {a.source_factor}")
    t0 = time.time()
    data = Path(a.data)
    rng = np.random.default_rng(a.seed)

    def sz(w, h):
        return (max(32, int(round(w * a.scale / 8)) * 8), max(16, int(round(h * a.scale / 4)) * 4))

    def cnt(n):
        return max(4, int(round(n * a.count)))
    n_gta, n_syn, gta_size, syn_size = cnt(64), cnt(48), sz(240, 132), sz(224, 132)
    write_gta5(data / "GTA5", n_gta, gta_size, rng)
    write_synthia(data / "SYNTHIA" / "RAND_CITYSCAPES", n_syn, syn_size, rng)
    write_cityscapes(data / "cityscapes", "train", ["aachen", "bochum", "zurich"], cnt(16), sz(256, 128), rng)
    write_cityscapes(data / "cityscapes", "val", ["frankfurt", "lindau"], cnt(7), sz(256, 128), rng)
    # --source-factor: the added source images come from streams of their own, so
    # everything written above stays byte-identical
    write_gta5(data / "GTA5", int(round(n_gta * a.source_factor)) - n_gta, gta_size,
               np.random.default_rng([a.seed, 1]), first=n_gta + 1, quirks=False)
    write_synthia(data / "SYNTHIA" / "RAND_CITYSCAPES", int(round(n_syn * a.source_factor)) - n_syn,
                  syn_size, np.random.default_rng([a.seed, 2]), first=n_syn + 1)
    print(f"toy datasets written to {data}/ (GTA5, SYNTHIA/RAND_CITYSCAPES, cityscapes) "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

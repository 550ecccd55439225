"""bench/pseudo_labels.py: do 03's pseudo labels know more than the warm-up classifier?

    python bench/pseudo_labels.py --data data --work work
    python bench/pseudo_labels.py --data toy --work toywork --radius 2 --device cpu

Self-training (05) can only gain where its pseudo labels are better than what the model
it starts from already predicts. On the target training images that have ground truth,
this compares, on exactly the pixels 03 labelled (not 255):
  - the accuracy of the pseudo labels (Eq. (6)) and of the 02 classifier's own argmax;
  - the same split into edge pixels (another ground-truth class within --radius pixels)
    and interior pixels, with the share of each that 03 labelled;
  - per class, the IoU of both on those pixels;
  - per class, how much of each class the pseudo labels hold: its share of the ground
    truth, of 02's argmax (all pixels) and of the pseudo labels, and the share of the
    pixels 02 predicts as that class that 03 labels at all; with --student, a later
    model's share too, to see whether it follows its pseudo labels' shares or drops a
    class they keep (on the toy data, with our first phi, 05 dropped car through Eq. (12): README).
It reads work/02_warmup/model.pt and work/03_maps/labels/, prints the tables and writes
nothing. The toy figures are quoted in README.md ("Does it adapt?").
"""
import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def edge_mask(gt, radius):
    """True where another ground-truth class (ignore included) lies within `radius` px."""
    h, w = gt.shape
    pad = np.pad(gt, radius, mode="edge")
    edge = np.zeros((h, w), bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            edge |= pad[radius + dy:radius + dy + h, radius + dx:radius + dx + w] != gt
    return edge


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data")
    p.add_argument("--work", default="work")
    p.add_argument("--radius", type=int, default=2, help="edge pixels: another class within this many px")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--student", default=None,
                   help="a later model (e.g. work/05_selftrain/model.pt): its argmax's class shares "
                        "are printed beside 02's and the pseudo labels'")
    a = p.parse_args(argv)
    if a.radius < 0:
        p.error(f"--radius must be >= 0, got {a.radius}")
    work = Path(a.work)
    model_path, labels = work / "02_warmup" / "model.pt", work / "03_maps" / "labels"
    student_path = Path(a.student) if a.student else None
    for path in (model_path, labels):
        if not path.exists():
            sys.exit(f"bench/pseudo_labels.py: {path} not found: run 02_warmup.py and 03_maps.py first")
    if student_path and not student_path.is_file():
        sys.exit(f"bench/pseudo_labels.py: --student {student_path} is not a model file")
    items = [(i, l) for i, l in common.cityscapes_items(a.data, "train", with_labels=True) if l is not None]
    if not items:
        sys.exit(f"bench/pseudo_labels.py: no target training image under {a.data} has ground truth "
                 "(gtFine/train/*_gtFine_labelIds.png): nothing to compare")
    device = common.pick_device(a.device)
    model, _ = common.model_from_checkpoint(model_path, device, "02_warmup")
    model.eval()
    student = None
    if student_path:
        student, _ = common.model_from_checkpoint(student_path, device)
        student.eval()
    n = common.NUM_CLASSES
    cm_pl, cm_02 = np.zeros((n, n + 1), np.int64), np.zeros((n, n + 1), np.int64)
    # per region: [pixels, labelled, PL right, 02 right on labelled, 02 right on all]
    split = {"edge": np.zeros(5, np.int64), "interior": np.zeros(5, np.int64)}
    # per class: ground truth, 02 argmax, pseudo labels, 02 argmax on the labelled pixels
    share = {k: np.zeros(n, np.int64) for k in ("gt", "02", "pl", "02 kept", "student")}
    for img_path, lab_path in tqdm(items, desc="images"):
        gt = common.decode_label(lab_path, "cityscapes").astype(np.int64)
        pl_path = labels / common.item_name(img_path)
        if not pl_path.exists():
            sys.exit(f"bench/pseudo_labels.py: {pl_path} not found: 03_maps.py labelled another "
                     f"image list than {a.data}'s target training images")
        pl = np.asarray(Image.open(pl_path)).astype(np.int64)
        if pl.shape != gt.shape:
            sys.exit(f"bench/pseudo_labels.py: {pl_path} is {pl.shape[1]}x{pl.shape[0]}, "
                     f"its ground truth {gt.shape[1]}x{gt.shape[0]}")
        img = common.image_tensor(img_path, device)
        pred = common.predict_logits(model, img, size=gt.shape).argmax(1)[0].cpu().numpy()
        valid = gt != common.IGNORE
        sel = valid & (pl != common.IGNORE)
        cm_pl += common.confusion(pl[sel], gt[sel], n)
        cm_02 += common.confusion(pred[sel], gt[sel], n)
        for k, v in (("gt", gt[valid]), ("02", pred[valid]), ("pl", pl[sel]), ("02 kept", pred[sel])):
            share[k] += np.bincount(v, minlength=n)[:n]
        if student is not None:
            spred = common.predict_logits(student, img, size=gt.shape).argmax(1)[0].cpu().numpy()
            share["student"] += np.bincount(spred[valid], minlength=n)[:n]
        edge = edge_mask(gt, a.radius)
        for name, m in (("edge", edge & valid), ("interior", ~edge & valid)):
            s = m & (pl != common.IGNORE)
            split[name] += [m.sum(), s.sum(), (pl[s] == gt[s]).sum(), (pred[s] == gt[s]).sum(),
                            (pred[m] == gt[m]).sum()]
    pct = lambda x, y: 100.0 * x / max(y, 1)
    total = sum(v[0] for v in split.values())
    labelled = cm_pl.sum()
    print(f"\n{len(items)} target training images, {total} pixels with ground truth, "
          f"{pct(labelled, total):.1f}% pseudo-labelled")
    print(f"on the pseudo-labelled pixels: pseudo labels {pct(np.trace(cm_pl[:, :n]), labelled):.1f}% accurate, "
          f"02's argmax {pct(np.trace(cm_02[:, :n]), labelled):.1f}% (on all pixels "
          f"{pct(sum(v[4] for v in split.values()), total):.1f}%)")
    print(f"{'region':<10}{'pixels':>10}{'labelled':>10}{'PL acc':>9}{'02 acc':>9}{'02 acc (all px)':>17}")
    for name, (px, lab, r_pl, r_02, r_all) in split.items():
        print(f"{name:<10}{px:>10}{pct(lab, px):>9.1f}%{pct(r_pl, lab):>8.1f}%{pct(r_02, lab):>8.1f}%"
              f"{pct(r_all, px):>16.1f}%")
    print(f"(edge: another ground-truth class within {a.radius} px)")
    print(f"\nper class IoU on the pseudo-labelled pixels\n{'class':<14}{'PL':>7}{'02':>7}{'PL - 02':>9}")
    a_pl, a_02 = 100 * common.iou_per_class(cm_pl), 100 * common.iou_per_class(cm_02)
    for c in range(n):
        if not np.isnan(a_pl[c]):
            print(f"{common.CLASSES[c]:<14}{a_pl[c]:7.1f}{a_02[c]:7.1f}{a_pl[c] - a_02[c]:+9.1f}")
    print(f"\nper class share of the pixels (%): ground truth, 02's argmax (all pixels), the pseudo "
          f"labels;\n'02 kept': of the pixels 02 predicts as the class, the share 03 labels at all\n"
          f"{'class':<14}{'truth':>8}{'02':>8}{'PL':>8}{'PL / 02':>9}{'02 kept':>9}"
          + (f"{'student':>9}" if student is not None else ""))
    for c in range(n):
        t, p2, pl_, st = (pct(share[k][c], share[k].sum()) for k in ("gt", "02", "pl", "student"))
        ratio = f"{pl_ / p2:9.2f}" if p2 > 0 else f"{'-':>9}"
        print(f"{common.CLASSES[c]:<14}{t:8.2f}{p2:8.2f}{pl_:8.2f}{ratio}"
              f"{pct(share['02 kept'][c], share['02'][c]):8.1f}%"
              + (f"{st:9.2f}" if student is not None else ""))
    if student is not None:
        print(f"(student: {student_path}, its argmax on all pixels with ground truth)")


if __name__ == "__main__":
    main()

"""bench/adaptation.py: does the method adapt? The toy pipeline over several seeds, with
the paper's ablations on the same seeds.

    python bench/adaptation.py                      # 3 seeds, the demo's configuration
    python bench/adaptation.py --seeds 0 1 2 3 4 --out bench/out/adaptation

For every seed it runs `demo.py --seed S` (toy data generated with that seed, then 01 ... 06
with the demo's flags; 02 and 04 start from one toy pre-training file shared by every seed,
or from random weights with --random-init), then (`--rows`, default all):
  - the target oracle: 02's recipe trained on the target training images with their
    ground truth, the headroom (oracle - 02) that an adaptation method can close;
and on the same 01-04 artifacts:
  - Table 4 rows: 05 with --no-stm, 05 with --no-consistency, and a control the paper has
    no row for: 05 with both target terms off (--alpha 0 --beta 0 --no-consistency), the
    same schedule, source term and target forwards without any target loss ("noTgt"), so
    that 05 - noTgt is what the self-training adds beyond the extra fine-tuning;
  - the ceiling of 05's target term: 05 trained on the target ground truth in place of
    03's pseudo labels ("05 GT"; same flags and upstream);
  - where 05 loses: 05 on the ground truth restricted to the pixels 03 labels (03's
    coverage without its label errors), and on 02's own argmax on those pixels (the same
    pixels and network, the classifier's labels instead of the MAPs assignment);
  - Table 3 / 5: 03 with --pla centroid (CAs-PLA) and --pla confidence (IAS-like) at the
    same pseudo-label ratio as MAPs, the accuracy and mIoU of each set of pseudo labels
    against the (toy) target ground truth, and 05 trained on each (Table 3's measure);
  - 06 variants: 06 on ProDA's labels (--conf-threshold 0.95 --scales 1), 06 with its
    student started as a copy of its teacher (--student-init teacher), and that student
    without the teacher's hard labels (--alpha 0 --beta 0: Eq. (11) off, the source term and
    the distillation term kept), which isolates what the hard labels do;
  - training-seed noise: 05 and 06 again with the stage seeds seed + 10 and seed + 20 on the
    same data and upstream runs, the run-to-run spread that stage differences are read against;
  - which classes the target terms teach: the share of each class's target training
    pixels that 03's labels (05's) and 06's round-1 teacher labels label correctly.
It prints per-seed target mIoU (toy Cityscapes val) of 02, 05 (student and EMA teacher)
and 06 (each round), the mean and the spread (sample standard deviation) over seeds,
and the paired gains 05 - 02 and 06 - 05. 05 and 06 save batch norm statistics
re-estimated on the target training images (--bn-images); beside them: 05 with the
running statistics of training ("05 rBN"), and 02 with its statistics re-estimated the
same way ("02 tBN", AdaBN; computed here from 02's model.pt), which tells how much of
05 - 02 the statistics alone explain. The figures are read from the stages'
manifests; every command is printed. A rerun reuses finished runs (each stage resumes
from its own folder; a stage whose flags or upstream runs changed runs again), so an
interrupted benchmark can simply be started again, and a seed folder whose work/ already
holds a finished pipeline (for example the data/ and work/ of a `python demo.py` run,
linked as <out>/seed0/data and <out>/seed0/work) is resumed in about a minute.
Seeds can run side by side: `--seeds 1` and `--seeds 2` in two shells with
OMP_NUM_THREADS=1, then the full list once more to print the table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import demo  # noqa: E402  (the demo's per-stage flags are the benchmark's)
from common import CLASSES, LabelTally, item_name, target_ground_truth, target_train_items  # noqa: E402


def run(cmd, log):
    print("$ " + " ".join(map(str, cmd)), flush=True)
    with open(log, "a") as f:
        subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, check=True, stdout=f,
                       stderr=subprocess.STDOUT)


def manifest(work, stage):
    return json.loads((Path(work) / stage / "manifest.json").read_text())


PRETRAINED = None   # --pretrained: the toy pre-training file every run of this bench starts from


def flags(stage, small=False):
    return dict(demo.configs(small, PRETRAINED))[stage]


def labelled_share(data, label_dir):
    """% of each class's target ground-truth pixels that a folder of pseudo labels labels
    correctly (03's and 06's reports, recomputed here so that older runs are read too)."""
    tally = LabelTally.of_folder(target_train_items(data), label_dir, target_ground_truth(data))
    return tally.report("gta5")["labelled_share"]


UPSTREAM_05 = ("01_stylize", "02_warmup", "03_maps", "04_stm")    # what 05 is made from
UPSTREAM_06 = UPSTREAM_05 + ("05_selftrain",)                     # what 06 is made from


def link_upstream(src, dst, stages):
    """A work folder for an ablation that shares the finished upstream stages of `src`."""
    dst.mkdir(parents=True, exist_ok=True)
    for s in stages:
        link = dst / s
        if not link.exists():
            link.symlink_to((src / s).resolve(), target_is_directory=True)


def replace_labels(src, dst, make, marker, note):
    """dst: a copy of 03's folder `src` whose label files hold make(name, pseudo) instead
    (pseudo: 03's label, 255 = unlabelled). 05 trained on it with the same flags and
    upstream isolates what the labels do. 03's own files are never touched; a marker file
    makes a finished copy final (a rerun reuses it). Bench only: the stages never read
    target labels."""
    import shutil
    import common
    done = dst / marker
    if done.exists():
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    for f in sorted((dst / "labels").iterdir()):
        common.save_png(f, make(f.name, common.decode_label(f, "trainid")), palette=True)
    done.write_text(note)


def ground_truth_as_labels(src, dst, data, on_mask=False):
    """The target ground truth as 05's labels: every labelled pixel ("05 GT", the ceiling
    of 05's target term), or with on_mask only the pixels 03 labels ("GT@03": 03's
    coverage with no label error, the cost of the errors alone)."""
    import common
    gt = common.target_ground_truth(data)

    def make(name, pseudo):
        if name not in gt:
            raise SystemExit(f"no target ground truth for {name} in {data}: the row needs it")
        y = common.decode_label(gt[name], "cityscapes")
        return np.where(pseudo == common.IGNORE, common.IGNORE, y).astype(np.uint8) if on_mask else y
    what = "on the pixels 03 labels" if on_mask else "on every labelled pixel"
    replace_labels(src, dst, make, "ground_truth_on_mask.txt" if on_mask else "ground_truth_labels.txt",
                   f"labels/ hold the target ground truth of {data} {what}, not 03's pseudo labels\n")


def warmup_argmax_as_labels(src, dst, data, work):
    """02's own prediction (argmax of its classifier) on the pixels 03 labels ("02@03"):
    the same pixels and the same network as 03's MAPs labels, with batch norm statistics
    as 03 computed its features (03's --bn-images on the target training images; 0: the
    running ones). Tells whether 03's assignment adds to, or takes from, what the
    warm-up's classifier already says there."""
    import common
    n = manifest(work, "03_maps")["args"]["bn_images"]
    model, _ = common.model_from_checkpoint(Path(work) / "02_warmup" / "model.pt", "cpu")
    if n > 0:
        common.recompute_bn_statistics(model, common.bn_images(common.target_train_items(data), n), "cpu")
    images = {common.item_name(i[0]): i[0] for i in common.target_train_items(data)}

    def make(name, pseudo):
        img = common.image_tensor(images[name])
        pred = common.predict_logits(model, img)[0].argmax(0).numpy()
        return np.where(pseudo == common.IGNORE, common.IGNORE, pred).astype(np.uint8)
    replace_labels(src, dst, make, "warmup_argmax_on_mask.txt",
                   "labels/ hold 02's argmax on the pixels 03 labels, not 03's pseudo labels\n")


def target_oracle_data(data, dst):
    """A data folder whose 'GTA5' holds the target training images with their ground truth
    (GTA5 labels and Cityscapes gtFine labelIds share one id space), Cityscapes linked:
    02 trained on it with the demo's flags is the target oracle, the most a method that
    sees target labels could reach with this network and schedule (bench only)."""
    (dst / "GTA5" / "images").mkdir(parents=True, exist_ok=True)
    (dst / "GTA5" / "labels").mkdir(parents=True, exist_ok=True)
    if not (dst / "cityscapes").exists():
        (dst / "cityscapes").symlink_to((Path(data) / "cityscapes").resolve(), target_is_directory=True)
    gt = target_ground_truth(data)
    for k, (img, _) in enumerate(target_train_items(data), 1):
        for a, b in ((img, f"images/{k:05d}.png"), (gt[item_name(img)], f"labels/{k:05d}.png")):
            if not (dst / "GTA5" / b).exists():
                (dst / "GTA5" / b).symlink_to(Path(a).resolve())
    return dst


def with_flag(args, name, value):
    """The demo's flags with one flag's value replaced (or added)."""
    args = list(args)
    if name in args:
        args[args.index(name) + 1] = str(value)
    else:
        args += [name, str(value)]
    return args


def warmup_with_target_bn(work, data):
    """02's model with its batch norm statistics re-estimated on the target training images
    as 05 re-estimated its own (its --bn-images): the AdaBN reference (Li et al., 2016)
    that tells how much of 05's gain over 02 the statistics alone would give."""
    import torch
    import common
    source = manifest(work, "02_warmup")["args"]["source"]
    n = manifest(work, "05_selftrain")["args"]["bn_images"] or 500  # 05 kept its running ones
    model, _ = common.model_from_checkpoint(Path(work) / "02_warmup" / "model.pt", "cpu")
    common.recompute_bn_statistics(model, common.bn_images(common.target_train_items(data), n), "cpu")
    cm = common.evaluate(model, common.target_val_items(data), "cityscapes", torch.device("cpu"), source)
    return common.summarize_iou(cm, source)["miou"]


ROWS = {"oracle": "02's recipe on the target ground truth",
        "table4": "05 without STM, without consistency, without its target terms (--alpha 0 --beta 0 "
                  "--no-consistency: the same fine-tuning on the source alone)",
        "control": "only the last of table4's runs (noTgt)",
        "labels": "05 on the ground truth, on the ground truth at 03's pixels, on 02's argmax at 03's pixels",
        "table3": "03 --pla centroid / confidence at MAPs' ratio, 04 and 05 on them",
        "distill": "06 on ProDA's labels (--conf-threshold 0.95 --scales 1), 06 --student-init teacher, "
                   "the same without the hard labels (--alpha 0 --beta 0)",
        "noise": "05 and 06 again with stage seeds seed + 10, seed + 20 (same data and upstream)"}


def mean_sd(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="bench/out/adaptation", help="data and work folders per seed")
    p.add_argument("--small", action="store_true", help="the demo's small configuration (a smoke run)")
    p.add_argument("--source-factor", type=float, default=1.0,
                   help="demo.py --source-factor: toy data with this many times the source images "
                        "(use a fresh --out: finished seeds are reused whatever their data)")
    p.add_argument("--no-ablations", action="store_true", help="only the pipeline per seed")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                   help="which groups of extra runs to make (default: all): " +
                        "; ".join(f"{k}: {v}" for k, v in ROWS.items()))
    init = p.add_mutually_exclusive_group()
    init.add_argument("--pretrained", metavar="FILE",
                      help="the toy_pretrain.py file every seed's 02 and 04 start from (demo.py "
                           "--pretrained FILE; default <out>/pretrained/toy_imagenet_resnet18.pth, made "
                           "once before the first seed when missing, about 10 minutes; seeds run side "
                           "by side need it made first: run one seed, or toy_pretrain.py --out FILE)")
    init.add_argument("--random-init", action="store_true",
                      help="demo.py --random-init: 02 and 04 from random weights; use a fresh --out")
    a = p.parse_args(argv)
    out = (ROOT / a.out) if not Path(a.out).is_absolute() else Path(a.out)
    global PRETRAINED
    if not a.random_init:
        a.pretrained = (Path(a.pretrained).resolve() if a.pretrained
                        else out / "pretrained" / Path(demo.PRETRAINED).name)
        if not a.pretrained.is_file():   # once for every seed (demo.py would make it per seed)
            a.pretrained.parent.mkdir(parents=True, exist_ok=True)
            run(["toy_pretrain.py", "--out", a.pretrained] + (demo.SMALL_PRETRAIN if a.small else []),
                a.pretrained.with_suffix(".log"))
        a.pretrained = str(a.pretrained)
    PRETRAINED = a.pretrained
    t0 = time.time()
    rows = []
    for seed in a.seeds:
        base = out / f"seed{seed}"
        data, work = base / "data", base / "work"
        log = base / "log.txt"
        base.mkdir(parents=True, exist_ok=True)
        # Always through demo.py: on a finished pipeline (e.g. the README's `python demo.py`,
        # linked here) every stage resumes, and a stage whose flags, defaults or upstream runs
        # are unchanged keeps its run (about a minute for 01-05); one whose flags changed runs
        # again, so the table never shows a stale stage.
        if (work / "export" / "manifest.json").exists():
            print(f"seed {seed}: resuming the pipeline in {work}", flush=True)
        run(["demo.py", "--data", data, "--work", work, "--seed", seed]
            + (["--small"] if a.small else [])
            + (["--pretrained", a.pretrained] if a.pretrained else ["--random-init"])
            # (the toy data is generated once; demo.py refuses a factor for existing data)
            + (["--source-factor", a.source_factor]
               if a.source_factor != 1 and not (data / "cityscapes").exists() else []), log)
        row = {"seed": seed,
               "02": manifest(work, "02_warmup")["summary"]["target_miou"],
               "02_source": manifest(work, "02_warmup")["summary"].get("source_miou"),
               "02_target_bn": warmup_with_target_bn(work, data),
               "05": manifest(work, "05_selftrain")["summary"]["target_miou"],
               "05_running_bn": manifest(work, "05_selftrain")["summary"].get("running_bn_target_miou"),
               "05_teacher": manifest(work, "05_selftrain")["summary"].get("teacher_target_miou"),
               "06": [r["target_miou"] for r in manifest(work, "06_distill")["summary"]["rounds"]],
               # what the figures depend on besides the seed (README, "Reproducibility")
               "environment": manifest(work, "02_warmup").get("environment"),
               "init": manifest(work, "02_warmup")["args"].get("weights")}
        s3 = manifest(work, "03_maps")["summary"]
        row["pl_maps"] = {"ratio": s3.get("pl_ratio"), "accuracy": s3.get("accuracy"), "miou": s3.get("miou")}
        # which classes the target terms of 05 (03's labels) and 06 (its teacher's) teach
        row["share_03"] = labelled_share(data, work / "03_maps" / "labels")
        row["share_06"] = labelled_share(data, work / "06_distill" / "round1" / "labels")
        if not a.no_ablations:
            def stage(name, w, *extra, args=None):
                """Run one stage in work folder w with `args` (default: the demo's flags) and
                `extra`; returns its manifest summary."""
                args = flags(name, a.small) if args is None else args
                run([f"{name}.py", "--data", data, "--work", w, "--seed", seed, "--device", "cpu",
                     *args, *extra], log)
                return manifest(w, name)["summary"]

            # ---- the target oracle: 02's recipe on the target ground truth (raw images, no
            # base resize: the target's own size), the headroom an adaptation can close ----
            if "oracle" in a.rows:
                od = target_oracle_data(data, base / "data_oracle")
                ow = base / "work_oracle"
                run(["02_warmup.py", "--data", od, "--work", ow, "--seed", seed, "--device", "cpu",
                     *flags("02_warmup", a.small), "--source-images", "raw", "--base-resize", "native"], log)
                row["oracle"] = manifest(ow, "02_warmup")["summary"]["target_miou"]
            # ---- Table 4: without STM, without consistency (same 01-04, same seed), and the
            # control the paper's table has no row for: 05 with both target terms off (Eq. (11)
            # by alpha = beta = 0, Eq. (12) by --no-consistency), i.e. the same schedule, source
            # term and target forwards (batch-norm statistics) without any target loss. 05's gain
            # over it is what the self-training adds; its gain over 02 also holds the extra
            # fine-tuning on the source ----
            for name, flags5 in (("no_stm", ("--no-stm",)), ("no_consistency", ("--no-consistency",)),
                                 ("no_target", ("--alpha", 0, "--beta", 0, "--no-consistency"))
                                 )[0 if "table4" in a.rows else 2 if "control" in a.rows else 3:]:
                w = base / f"work_{name}"
                link_upstream(work, w, UPSTREAM_05)
                row[f"05_{name}"] = stage("05_selftrain", w, *flags5)["target_miou"]
            # ---- 05 on other target labels (same 01, 02, 04): the ground truth on every
            # pixel (the ceiling of 05's target term), the ground truth on 03's pixels only
            # (no label error), 02's own argmax on 03's pixels (where 05 loses) ----
            src = work / "03_maps"
            for name, make in (("gt_labels", lambda d: ground_truth_as_labels(src, d, data)),
                               ("gt_on_mask", lambda d: ground_truth_as_labels(src, d, data, True)),
                               ("warmup_on_mask", lambda d: warmup_argmax_as_labels(src, d, data, work))
                               ) * ("labels" in a.rows):
                w = base / f"work_{name}"
                link_upstream(work, w, ("01_stylize", "02_warmup", "04_stm"))
                make(w / "03_maps")
                row[f"05_{name}"] = stage("05_selftrain", w)["target_miou"]
            if "labels" in a.rows:
                row["pl_warmup_on_mask"] = LabelTally.of_folder(
                    target_train_items(data), base / "work_warmup_on_mask" / "03_maps" / "labels",
                    target_ground_truth(data)).report("gta5")["accuracy"]
            # ---- 06 on the same 01-05 with other labels or another start: ProDA's labels
            # (confidence > 0.95, one scale), the student started as a copy of its teacher
            # (tells whether 06's objective or the student's start holds it back), and that
            # student without Eq. (11) (tells what the teacher's hard labels do) ----
            as_teacher = (("--student-init", "teacher"),)
            for name, changes in (("proda_labels", (("--conf-threshold", 0.95), ("--scales", 1))),
                                  ("teacher_init", as_teacher),
                                  ("teacher_init_no_labels", as_teacher + (("--alpha", 0), ("--beta", 0)))
                                  ) * ("distill" in a.rows):
                w = base / f"work_06_{name}"
                link_upstream(work, w, UPSTREAM_06)
                f6 = flags("06_distill", a.small)
                for flag, value in changes:
                    f6 = with_flag(f6, flag, value)
                row[f"06_{name}"] = stage("06_distill", w, args=f6)["target_miou"]
            # ---- training-seed noise: 05 and 06 again with stage seeds seed + 10 and seed + 20
            # (same data, same upstream runs; 06 from the bench's own 05), so that a difference
            # between stages can be read against the run-to-run spread of each ----
            if "noise" in a.rows:
                row["noise_seeds"] = [seed, seed + 10, seed + 20]
                row["05_noise"], row["06_noise"] = [row["05"]], [row["06"][-1]]
                for ts in row["noise_seeds"][1:]:
                    w = base / f"work_05_seed{ts}"
                    link_upstream(work, w, UPSTREAM_05)
                    row["05_noise"].append(stage("05_selftrain", w, "--seed", ts)["target_miou"])
                    w = base / f"work_06_seed{ts}"
                    link_upstream(work, w, UPSTREAM_06)
                    row["06_noise"].append(stage("06_distill", w, "--seed", ts)["target_miou"])
            # ---- Table 3 / 5: centroid (CAs-PLA) and confidence (IAS-like) pseudo labels at
            # the MAPs ratio, then 04 and 05 on them as on MAPs' (Table 3 is 05's mIoU) ----
            for pla in ("centroid", "confidence") * ("table3" in a.rows):
                w = base / f"work_{pla}"
                link_upstream(work, w, ("01_stylize", "02_warmup"))
                f3 = with_flag(flags("03_maps", a.small), "--target-ratio", round(s3["pl_ratio"], 4))
                c3 = stage("03_maps", w, "--pla", pla, args=f3)
                row[f"pl_{pla}"] = {"ratio": c3.get("pl_ratio"), "accuracy": c3.get("accuracy"),
                                    "miou": c3.get("miou")}
                stage("04_stm", w)
                row[f"05_{pla}"] = stage("05_selftrain", w)["target_miou"]
        rows.append(row)
        (out / "results.json").write_text(json.dumps(rows, indent=1))

    # ============ the report ============
    def fmt(x):  # no figure (a run left out, or a mean over none): a dash, not nan
        return "  -  " if x is None or x != x else f"{x:5.1f}"
    n6 = max(len(r["06"]) for r in rows)
    head = ["seed", "02", "02 tBN", "05", "05 rBN", "05 EMA", *[f"06 r{k + 1}" for k in range(n6)],
            "05-02", "05-02bn", "06-05"]
    if not a.no_ablations:
        head += ["noSTM", "noCons", "noTgt", "05 GT", "oracle"]
    print("\n" + "=" * 78)
    print(f"BiSMAP toy adaptation over seeds {a.seeds} (target: toy Cityscapes val, mIoU %), "
          f"{time.time() - t0:.0f} s")
    print("=" * 78)
    for env in {json.dumps(r.get("environment"), sort_keys=True) for r in rows}:
        e = json.loads(env)
        print("warm-up run on: " + ("(not recorded)" if not e else
                                    f"{e['cpu']} ({e['cpu_capability']}), {e['threads']} thread(s), "
                                    f"torch {e['torch']}" + (f", {e['cuda']}" if e.get("cuda") else "")))
    for init in sorted({str(r.get("init")) for r in rows}):
        print("02's backbone and 04's E-hat start from: " +
              ("random weights" if init == "none" else f"{init} (toy pre-training)"))
    print(" ".join(f"{h:>7}" for h in head))
    cols = {h: [] for h in head[1:]}
    for r in rows:
        vals = [r["02"], r["02_target_bn"], r["05"], r["05_running_bn"], r["05_teacher"], *r["06"],
                r["05"] - r["02"], r["05"] - r["02_target_bn"], r["06"][-1] - r["05"]]
        if not a.no_ablations:
            vals += [r.get("05_no_stm"), r.get("05_no_consistency"), r.get("05_no_target"),
                     r.get("05_gt_labels"), r.get("oracle")]
        for h, v in zip(head[1:], vals):
            cols[h].append(v)
        print(f"{r['seed']:>7} " + " ".join(f"{fmt(v):>7}" for v in vals))
    ms = {h: mean_sd(v) for h, v in cols.items()}
    print(f"{'mean':>7} " + " ".join(f"{fmt(ms[h][0]):>7}" for h in head[1:]))
    print(f"{'spread':>7} " + " ".join(f"{fmt(ms[h][1]):>7}" for h in head[1:]))
    spread = max(ms["02"][1], ms["05"][1])
    gain = ms["05"][0] - ms["02"][0]
    print(f"\n05 vs 02: mean gain {gain:+.1f} mIoU; seed spread (sd of 02, of 05) "
          f"{ms['02'][1]:.1f}, {ms['05'][1]:.1f}: "
          + ("05 beats 02 by more than the spread" if gain > spread else "NOT beyond the spread"))
    pg, psd = ms["05-02"]
    print(f"05 - 02 paired per seed: {pg:+.1f} +- {psd:.1f} (sd): "
          + ("above zero by more than its sd" if pg > psd else "NOT above zero by more than its sd"))
    pb, pbsd = ms["05-02bn"]
    print(f"05 - (02 with target batch norm statistics, AdaBN) paired per seed: {pb:+.1f} +- {pbsd:.1f}: "
          + ("self-training adds to what the statistics alone give" if pb > pbsd else
             "self-training does NOT add to what the statistics alone give"))
    pt, ptsd = mean_sd([r["05"] - r["05_no_target"] for r in rows if r.get("05_no_target") is not None])
    if pt == pt:
        print(f"05 - (05 without its target terms: source + STM only, same schedule) paired per seed: "
              f"{pt:+.1f} +- {ptsd:.1f}: " + ("the self-training terms add to the fine-tuning" if pt > ptsd else
                                               "the self-training terms do NOT add to the fine-tuning"))
    g6 = ms[f"06 r{n6}"][0] - ms["05"][0]
    print(f"06 (last round) vs 05: mean {g6:+.1f} mIoU: " + ("06 >= 05" if g6 >= 0 else "06 < 05"))
    if not a.no_ablations:
        print("\nTable 4 on the toy data (mean over seeds, target mIoU %):")
        for label, h in (("02 warm-up (GPA baseline)", "02"),
                         ("02, statistics re-estimated on target (AdaBN)", "02 tBN"), ("05 without STM", "noSTM"),
                         ("05 without consistency", "noCons"),
                         ("05 without its target terms (source + STM)", "noTgt"),
                         ("05 full (STM + MAPs + consistency)", "05"),
                         ("05 on the target ground truth (ceiling)", "05 GT"),
                         ("02's recipe on the target ground truth (oracle)", "oracle"),
                         (f"06 distillation (round {n6})", f"06 r{n6}")):
            if ms[h][0] == ms[h][0]:  # rows whose runs --rows left out have no figure (nan)
                print(f"  {label:<38} {ms[h][0]:5.1f} +- {ms[h][1]:.1f}")
        ho, hsd = mean_sd([r["oracle"] - r["02"] for r in rows if r.get("oracle") is not None])
        cl, clsd = mean_sd([(r["05"] - r["02"]) / (r["oracle"] - r["02"]) for r in rows
                            if r.get("oracle") is not None and r["oracle"] > r["02"]])
        if ho == ho:
            print(f"  headroom, oracle - 02: {ho:+.1f} +- {hsd:.1f}; share of it 05 closes: "
                  f"{100 * cl:.0f}% +- {100 * clsd:.0f}%")
        if "table3" in a.rows:
            print("\nTable 3 / 5 on the toy data: pseudo labels at equal ratio (accuracy %, mIoU %) "
                  "and 05 trained on them (target mIoU %):")
            for r in rows:
                print(f"  seed {r['seed']}: " + " | ".join(
                    f"{name} {100 * r[k]['ratio']:.1f}% acc {100 * r[k]['accuracy']:.1f} mIoU {r[k]['miou']:.1f}"
                    f" -> 05 {fmt(r[k5]).strip()}" for name, k, k5 in
                    (("MAPs", "pl_maps", "05"), ("CAs", "pl_centroid", "05_centroid"),
                     ("IAS", "pl_confidence", "05_confidence"))))
            for name, k5 in (("MAPs", "05"), ("CAs", "05_centroid"), ("IAS", "05_confidence")):
                m, sd = mean_sd([r.get(k5) for r in rows])
                print(f"  05 on {name:<4} labels: {m:5.1f} +- {sd:.1f}")
        if "labels" in a.rows:
            print("\nWhere 05 loses (same seeds, flags and upstream; only 05's target labels differ; "
                  "mean +- spread, and paired with 05 on 03's MAPs labels):")
            for label, k in (("03's MAPs labels (05 as shipped)", "05"),
                             ("02's own argmax on 03's pixels", "05_warmup_on_mask"),
                             ("ground truth on 03's pixels", "05_gt_on_mask"),
                             ("ground truth on every pixel (05 GT)", "05_gt_labels")):
                m, sd = mean_sd([r.get(k) for r in rows])
                dm, dsd = mean_sd([None if r.get(k) is None else r[k] - r["05"] for r in rows])
                print(f"  {label:<38} {m:5.1f} +- {sd:.1f}   {dm:+5.1f} +- {dsd:.1f}")
            accs = [(100 * r["pl_maps"]["accuracy"], 100 * r["pl_warmup_on_mask"]) for r in rows
                    if r.get("pl_warmup_on_mask") is not None]
            if accs:
                print("  label accuracy on 03's pixels, MAPs vs 02's argmax: "
                      + ", ".join(f"{x:.1f} vs {y:.1f}" for x, y in accs))
    if "distill" in a.rows and not a.no_ablations:
        print(f"\n06 variants on the same 01-05 (round {n6}, target mIoU %): the demo's 06 (official "
              "labels: every pixel, 3 scales + flip), ProDA's labels (confidence > 0.95, one scale), "
              "the student started as a copy of its teacher (official labels), and that student "
              "without the hard labels (Eq. (11) off: source and distillation terms only)")
        print(f"{'seed':>7} {'05':>7} {'06':>7} {'ProDA':>7} {'s=t':>7} {'s=t -PL':>7}")
        v6 = [[r["05"], r["06"][-1], r.get("06_proda_labels"), r.get("06_teacher_init"),
               r.get("06_teacher_init_no_labels")] for r in rows]
        for r, v in zip(rows, v6):
            print(f"{r['seed']:>7} " + " ".join(f"{fmt(x):>7}" for x in v))
        print(f"{'mean':>7} " + " ".join(f"{fmt(mean_sd(c)[0]):>7}" for c in zip(*v6)))
    if "noise" in a.rows and not a.no_ablations:
        print("\nTraining-seed noise (same data and upstream runs; 06 from the bench's 05), target mIoU %:")
        for r in rows:
            (m5, s5), (m6, s6) = mean_sd(r["05_noise"]), mean_sd(r["06_noise"])
            seeds = "/".join(map(str, r["noise_seeds"]))
            print(f"  seed {r['seed']} (stage seeds {seeds}): "
                  f"05 {' '.join(f'{x:.1f}' for x in r['05_noise'])} ({m5:.1f} +- {s5:.1f}); "
                  f"06 {' '.join(f'{x:.1f}' for x in r['06_noise'])} ({m6:.1f} +- {s6:.1f}); "
                  f"05 - 02 {m5 - r['02']:+.1f}, 06 - 05 {m6 - r['05']:+.1f}")
    print("\nShare of each class's target training pixels that the pseudo labels label correctly "
          "(%, mean over seeds):\n  05 learns from 03's MAPs labels, 06 from its teacher's (round 1)")
    print("  " + " ".join(f"{c[:5]:>5}" for c in CLASSES))
    for label, key in (("03", "share_03"), ("06", "share_06")):
        vals = [statistics.mean(r[key][c] for r in rows) if all(r[key][c] is not None for r in rows)
                else None for c in CLASSES]
        print(f"{label:>2} " + " ".join("    -" if v is None else f"{v:5.1f}" for v in vals))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

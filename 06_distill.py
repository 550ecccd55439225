"""06_distill.py: self-distillation into a fresh student (BiSMAP Sec. 4.3, the rows marked
"*" in Tables 1/2: 61.2 / 62.8 mIoU; the stage comes from ProDA, Zhang et al. CVPR 2021).

Each round r = 1..R:
  1. the teacher (round 1: 05's self-trained model; round r+1: round r's student) labels
     every target training image with the argmax of its logits averaged over --scales
     (0.75, 1, 1.5) and a horizontal flip, every pixel labelled: the official code's
     inference.py, which makes 06's labels (its colorize_save is called with threshold=0).
     --conf-threshold 0.95 --scales 1 is ProDA's stages 2 and 3 instead (255 where the
     confidence is at or below 0.95); on three seeds of the toy data it gave a 06 0.4-1.8
     mIoU above the official labels' (bench/adaptation.py --rows distill; README "Does it
     adapt?");
  2. a new student (started from --student-init) is trained with
        L = L_ce (Eq. (10), STM-weighted source)  +  L_sce (Eq. (11), teacher pseudo labels)
            + --kd-weight * KL(p_teacher || p_student)   on the same target crop,
     the KL computed correctly: log-probabilities for the student, probabilities for the
     teacher, divided by the number of classes and averaged over pixels, the official
     scale, as Eq. (12) in 05 (--official-kl reproduces the
     official code's kl_div(softmax(student), softmax(teacher)), which is not a KL).
As in 05 (--bn-stats target, our departure from the official code), only the target
forward updates the student's batch-norm running statistics, which the saved model keeps:
with the source forward updating them too they are a blend of the two domains that no
target image has. --bn-stats official restores the official behaviour.

Reads:  work/05_selftrain/model.pt, work/01_stylize/images, work/04_stm/stm, data/cityscapes
Writes: work/06_distill/round<r>/{labels/*.png, labels_report.json, model.pt, best.pt, last.pt,
        log.jsonl},
        work/06_distill/model.pt (the last round's student), manifest.json

Real data (one GPU):
    python 06_distill.py --data data --work work --student-init pretrained/r101_1x_sk0.pth
  several GPUs:  torchrun --nproc_per_node 4 06_distill.py --batch-size 1 ...
Toy data (CPU):
    python 06_distill.py --student-init warmup-full --rounds 1 --iters 200 --batch-size 4 \
        --crop 128 64 --eval-every 200 --workers 0
  (no SimCLRv2 weights exist for the toy data: the student starts from 02's model; with
  `warmup` (02's backbone, a fresh head) one toy run ended at 23.0 mIoU against 27.3 for
  `warmup-full`, its teacher at 29.0: a fresh head does not catch up in 200 iterations.
  `teacher` starts the student as a copy of its teacher, a diagnostic, not the paper's
  stage: it tells whether 06's objective or the student's start is what holds 06 back, and
  with --alpha 0 --beta 0 (Eq. (11) off) what the teacher's hard labels do;
  `python bench/adaptation.py --rows distill` measures both on every seed, README "Does it adapt?".)

Student weights: the paper and ProDA start the student from a SimCLRv2 ResNet-101
(r101_1x_sk0, a TensorFlow checkpoint of google-research/simclr). --student-init PATH takes
  - the file the public converter writes (github.com/Separius/SimCLRv2-Pytorch:
    `python download.py r101_1x_sk0; python convert.py r101_1x_sk0/model.ckpt-250228` ->
    r101_1x_sk0.pth = {'resnet': ..., 'head': ...}; README.md "Real data"): loaded strictly
    into common.SimCLRResNet, then renamed tensor by tensor onto the DeepLabV3+ backbone
    (common.simclr_to_torchvision; the two compute the same features, tests/test_simclr.py);
  - ProDA's / the official code's pretrained/r101_1x_sk0.pth ({'state_dict': ...} with
    torchvision names conv1, bn1, layer1.0.conv1, ...), or any torchvision-layout state dict.
Every backbone tensor must be found with its shape, otherwise the missing and mis-shaped
keys are listed; keys the backbone has no use for (fc, the projection head) are listed once
and recorded in the manifest. The official code loads this file by name matching, which
skips a non-matching key silently (luyvlei/BiSMAPs models/adaptation_model.py l.87).
`imagenet` uses torchvision's ImageNet weights (a weaker start than SimCLRv2).
"""
import shutil

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common


# ============ the distillation loss ============
def distill_kl(teacher_logits, student_logits, mask=None, official=False):
    """The distillation term on a target crop, at the official scale (averaged over pixels
    and classes, like nn.KLDivLoss()'s default and the official expression below).

    official=False: KL(p_teacher || p_student) / C averaged over the pixels where mask is
    True (common.kl_divergence, the same scale as Eq. (12)).
    official=True: the official code's expression (luyvlei/BiSMAPs
    models/adaptation_model.py, CustomModel.step, distillation branch):
    F.kl_div(softmax(student), softmax(teacher), reduction='none'), then summed and divided
    by the count of a mask `teacher != 250` that holds for every element of the
    probability tensor, i.e. the mean over all B*C*H*W elements. kl_div takes its input
    as log-probabilities, so this is sum_c p_t (log p_t - p_s) / C: not a divergence (not
    0 when the two agree, and its gradient is -p_t / C instead of (p_s - p_t) / C). Here
    `mask` restricts the mean to valid pixels (all classes of each); without padding it
    equals the official value."""
    if not official:
        return common.kl_divergence(teacher_logits, student_logits, mask)
    kl = F.kl_div(student_logits.float().softmax(1), teacher_logits.float().softmax(1),
                  reduction="none").mean(1)                                # (B, H, W)
    return kl.mean() if mask is None else kl[mask].sum() / mask.sum().clamp(min=1)


# ============ teacher pseudo labels ============
@torch.no_grad()
def teacher_probs(model, img_u8, scales=(1.0,), flip=True):
    """Softmax of the teacher's logits averaged over scales and a horizontal flip, at input
    size. img_u8: (1, 3, H, W) uint8. Returns (1, C, H, W).
    The official code makes 06's labels this way (luyvlei/BiSMAPs inference.py, main and
    colorize_save: the logits at scales 768x1536, 1024x2048 and 1536x3072 of a 1024x2048
    image and their flips, each upsampled to the image, summed / 6, then softmax and argmax).
    ProDA averages probabilities over the flip instead (generate_pseudo_label.py); with
    every pixel labelled (--conf-threshold 0) only the argmax matters."""
    h, w = img_u8.shape[-2:]
    acc = 0
    for s in scales:
        x = img_u8 if s == 1.0 else F.interpolate(img_u8.float(), scale_factor=s, mode="bilinear",
                                                  align_corners=False).round().clamp(0, 255).byte()
        for f in ((False, True) if flip else (False,)):
            out = common.predict_logits(model, x.flip(-1) if f else x, size=(h, w))
            acc = acc + (out.flip(-1) if f else out)
    return (acc / (len(scales) * (2 if flip else 1))).softmax(1)


def pseudo_label(prob, conf_threshold=0.0):
    """argmax of the averaged prediction; 255 where its confidence is at or below the
    threshold, as the official colorize_save (inference.py) and ProDA's loader
    (data/cityscapes_dataset.py: lp[conf <= threshold] = 250) do; 0 keeps every pixel,
    a softmax maximum is never 0."""
    conf, lab = prob.max(1)                                                # (1, H, W)
    lab[conf <= conf_threshold] = common.IGNORE
    return lab[0].byte().cpu().numpy()


def write_pseudo_labels(model, items, out_dir, device, scales, conf, rank, world):
    done = 0
    for p, _ in tqdm(items[rank::world], desc="teacher labels", disable=rank != 0):
        out = out_dir / common.item_name(p)
        if out.exists():  # written atomically: an existing file is complete
            continue
        img = common.image_tensor(p, device)
        common.save_png(out, pseudo_label(teacher_probs(model, img, scales), conf), palette=True)
        done += 1
    common.barrier()
    return done


def label_report(items, label_dir, gt_for, source, out):
    """03's pseudo-label report for a round's teacher labels (ratio; against the target
    ground truth where it exists: accuracy, per-class IoU, the share of each class's pixels
    labelled, classes left without a correct label); written to `out`, summary returned."""
    tally = common.LabelTally.of_folder(items, label_dir, gt_for)
    tally.log(source, "the teacher's pseudo labels")
    common.save_json(out, tally.report(source))
    return tally.summary(source)


def main(argv=None):
    p = common.base_parser(__doc__, training=True)
    p.set_defaults(batch_size=4, backbone=None)
    g = p.add_argument_group("distillation (Sec. 4.3; ProDA)")
    g.add_argument("--rounds", type=int, default=2, help="distillation rounds (official pipeline: 2)")
    g.add_argument("--student-init", default="imagenet",
                   help="student start: imagenet, none, warmup (the backbone of 02's "
                        "source-trained model, a stand-in for the self-supervised SimCLRv2 start "
                        "where no pre-trained weights exist), warmup-full (02's whole network, "
                        "head included: the toy demo's choice, see the docstring), or a file: the "
                        "SimCLRv2 converter's r101_1x_sk0.pth (the paper's student, Sec. 4.3 via "
                        "ProDA), ProDA's pretrained/r101_1x_sk0.pth ({'state_dict': ...}), or a "
                        "torchvision-layout state dict; every backbone tensor must be found (see "
                        "the docstring); or teacher (a copy of the round's teacher, head included: "
                        "05's model in round 1, the previous student after; a diagnostic, see "
                        "the docstring). Except with warmup-full and teacher the head starts fresh.")
    g.add_argument("--kd-weight", type=float, default=1.0,
                   help="weight of the distillation term, averaged over pixels and classes as in "
                        "the official code (the paper is silent; official: 1.0)")
    g.add_argument("--official-kl", action="store_true",
                   help="use the official code's mean of kl_div(softmax(s), softmax(t)) (not a "
                        "KL; for exact comparison with the published numbers)")
    g.add_argument("--alpha", type=float, default=0.1, help="alpha of Eq. (11)")
    g.add_argument("--beta", type=float, default=1.0, help="beta of Eq. (11)")
    g.add_argument("--scales", type=float, nargs="+", default=[0.75, 1.0, 1.5],
                   help="test-time scales for the teacher's pseudo labels, flip always (official "
                        "inference.py: 768x1536, 1024x2048, 1536x3072 of a 1024x2048 image; "
                        "ProDA: 1)")
    g.add_argument("--conf-threshold", type=float, default=0.0,
                   help="ignore teacher pseudo labels whose confidence (softmax of the averaged "
                        "logits) is at or below this; 0, the official code's (inference.py calls "
                        "colorize_save with threshold=0), keeps every pixel; ProDA's stages 2 and "
                        "3 use 0.95")
    common.add_bn_stats_arg(g, "source")
    common.add_bn_images_arg(g)
    g.add_argument("--no-stm", action="store_true", help="uniform source weights")
    p.set_defaults(warmup_iters=None)
    args = p.parse_args(argv)
    if args.warmup_iters is None:  # official: 400 of 90,000 (configs/gta5_dill.yml lr_schedule)
        args.warmup_iters = common.official_fraction(args.iters, 400)
    stage, device, rank, world = common.start(args, "06_distill")
    st = stage.use("05_selftrain")
    args.backbone = args.backbone or st["args"]["backbone"]
    if args.student_init == "teacher" and st["args"]["backbone"] != args.backbone:
        raise common.StageError(f"--student-init teacher: 05's backbone is {st['args']['backbone']} "
                                f"but the student's is {args.backbone}")
    warm_init = None
    if args.student_init in ("warmup", "warmup-full"):
        warm = stage.use("02_warmup")
        if warm["args"]["backbone"] != args.backbone:
            raise common.StageError(f"--student-init {args.student_init}: 02's backbone is "
                                    f"{warm['args']['backbone']} "
                                    f"but the student's is {args.backbone}")
        warm_init = common.stage_dir(args.work, "02_warmup") / "model.pt"
    src_ds = common.source_dataset(args, stage, use_stm=not args.no_stm)
    targets = common.target_train_items(args.data)
    val = common.target_val_items(args.data)
    resuming = stage.begin(check=[src_ds, common.SegDataset(targets, None), val])

    teacher_path = common.stage_dir(args.work, "05_selftrain") / "model.pt"
    stage.add_input(teacher_path)
    bn_items = common.bn_images(targets, args.bn_images)
    gt_for = common.target_ground_truth(args.data)  # for the label reports only
    rounds = []
    for r in range(1, args.rounds + 1):
        rdir = stage.dir / f"round{r}"
        # ============ 1. teacher pseudo labels ============
        teacher, _ = common.model_from_checkpoint(teacher_path, device, "05_selftrain")
        teacher.requires_grad_(False)
        common.log0(f"round {r}/{args.rounds}: teacher {teacher_path}")
        write_pseudo_labels(teacher, targets, rdir / "labels", device, args.scales,
                            args.conf_threshold, rank, world)
        if (rdir / "model.pt").exists() and resuming:
            ck = common.load_checkpoint(rdir / "model.pt")
            rounds.append(ck["summary"])
            teacher_path = rdir / "model.pt"
            common.log0(f"round {r} already finished: {ck['summary']['target_miou']:.1f} mIoU")
            continue
        labels = None
        if rank == 0:
            labels = label_report(targets, rdir / "labels", gt_for, args.source, rdir / "labels_report.json")
            common.log0(f"round {r}: teacher labels on {100 * labels['pl_ratio']:.1f}% of the target pixels"
                        + (f", accuracy {100 * labels['accuracy']:.1f}%" if "accuracy" in labels else ""))
        tgt_ds = common.target_dataset(args, rdir / "labels", "06_distill")

        # ============ 2. a new student (started from --student-init) ============
        common.seed_everything(args.seed + 1000 * r + rank)
        model = common.build_model(args.backbone, "none")
        if args.student_init == "teacher":          # a copy of this round's teacher, head included
            common.load_state_strict(model, teacher.state_dict(), what=f"--student-init teacher ({teacher_path})")
            init = {"spec": "teacher", "layout": "this round's teacher, head included", "path": str(teacher_path)}
        elif warm_init is not None:
            sd = common.load_checkpoint(warm_init, "02_warmup")["model"]
            if args.student_init == "warmup-full":  # 02's whole network
                common.load_state_strict(model, sd, what=f"--student-init warmup-full ({warm_init})")
                layout = "02 source-trained network, head included"
            else:                                   # 02's backbone, a fresh head
                common.load_state_strict(model.backbone, {k[len("backbone."):]: v for k, v in sd.items()
                                                          if k.startswith("backbone.")},
                                         what=f"--student-init warmup ({warm_init})")
                layout = "02 source-trained backbone"
            init = {"spec": args.student_init, "layout": layout, "path": str(warm_init)}
        else:
            init = common.load_backbone_init(model.backbone, args.backbone, args.student_init)
        model = model.to(device)
        ddp = common.wrap_ddp(model, device)
        loaders = None

        def step_loss(it):
            nonlocal loaders
            if loaders is None:
                loaders = [common.infinite_loader(ds, args.batch_size, args.workers, args.seed + 7 * r + k,
                                                  rank, world, start_epoch=args._start_iter)
                           for k, ds in enumerate((src_ds, tgt_ds))]
            s, t = next(loaders[0]), next(loaders[1])
            xs, ys = common.normalize(s["image"].to(device)), s["label"].to(device)
            ws = None if args.no_stm else s["stm"].to(device).float() / 255
            # --bn-stats target: the source forward leaves the running statistics to the target
            # forward, as in 05 (the official code lets both update them)
            with common.frozen_bn_statistics(model, args.bn_stats == "target"):
                ls = ddp(xs)[1]
            loss_ce = common.weighted_ce(common.upsample(ls, ys.shape[-2:]), ys, ws)  # Eq. (10)
            xt, yt = common.normalize(t["image"].to(device)), t["label"].to(device)
            lt = common.upsample(ddp(xt)[1], yt.shape[-2:])                      # (B, C, H, W)
            with torch.no_grad():
                lteach = common.upsample(teacher(xt)[1], yt.shape[-2:])
            loss_sce = common.symmetric_ce(lt, yt, args.alpha, args.beta)       # Eq. (11)
            loss_kd = distill_kl(lteach, lt, t["valid"].to(device), args.official_kl)
            loss = loss_ce + loss_sce + args.kd_weight * loss_kd
            return loss, {"loss": loss.item(), "ce": loss_ce.item(), "sce": loss_sce.item(),
                          "kd": loss_kd.item()}

        final, best, state = common.train_loop(args, rdir, model, step_loss, val,
                                               resume=resuming, bn_items=bn_items)
        summary = {"round": r, "teacher": str(teacher_path), "target_miou": final["miou"], "labels": labels,
                   "running_bn_target_miou": final.get("running_bn_miou"),
                   "target": final, "best": best, "student_init": init}
        if rank == 0:
            common.save_checkpoint(rdir / "model.pt", **state, summary=summary)
        common.barrier()
        rounds.append(summary)
        common.log0(f"round {r}: target val mIoU {final['miou']:.1f}")
        teacher_path = rdir / "model.pt"
        resuming = False  # later rounds start fresh

    if rank == 0:
        with common.atomic_write(stage.dir / "model.pt") as tmp:
            shutil.copyfile(teacher_path, tmp)
        stage.finish({"target_miou": rounds[-1]["target_miou"],
                      "rounds": [{k: v for k, v in x.items() if k != "target"} for x in rounds],
                      "selftrain_target_miou": st["summary"]["target_miou"],
                      "official_kl": args.official_kl, "student_init": args.student_init,
                      "conf_threshold": args.conf_threshold, "bn_images": len(bn_items)})
        print("06_distill: target val mIoU per round: "
              + ", ".join(f"round {x['round']} {x['target_miou']:.1f}" for x in rounds)
              + f" (05: {st['summary']['target_miou']:.1f}) -> {stage.dir / 'model.pt'}")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)

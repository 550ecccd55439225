"""05_selftrain.py: bidirectional self-training (BiSMAP Sec. 3.5, Eq. (10)-(13)).

The segmentor is trained again from the warm-up's own initialisation (Fig. 3b: "E is
retrained"; the official configs/gta5_st.yml starts from ImageNet weights with
resume_flag False, the warm-up model having served only to produce the pseudo labels of
03 and the entropies of 04). Each iteration takes a batch of stylized source images and a
batch of target images and minimises
    L = L_ce + L_sce + lambda * L_consist                                      Eq. (13)
  L_ce:      source cross-entropy, each pixel weighted by its transferability w_i (04)  Eq. (10)
  L_sce:     symmetric cross-entropy on the target with the pseudo labels of 03         Eq. (11)
  L_consist: KL(teacher || student) per pixel, divided by the number of classes (the
             official nn.KLDivLoss() scale that lambda = 20 was tuned for; see
             common.kl_divergence); the teacher is an EMA of the student and sees the
             clean target crop, the student sees phi(x^t) = photometric RandAugment +
             CutOut (a black square of 0.2 x the crop width) of the same crop, as the
             official loader draws them; cut-out pixels are excluded                    Eq. (12)

As in the official code (luyvlei/BiSMAPs models/adaptation_model.py, CustomModel.step):
  - the student starts from 02's initialisation (--init retrain: CustomModel.setup loads
    the ImageNet backbone, a fresh head), and the EMA teacher starts as its copy; --init
    warmup fine-tunes 02's model instead (ProDA's stage 1). With a short schedule the EMA
    decay keeps the official time constant as a fraction of the run (1,000 of 90,000
    iterations), or the teacher would stay the untrained start;
  - the teacher runs with batch norm in training mode (statistics of the current target
    batch) and its dropout off (common.teacher_forward);
  - the student forwards the source batch, the augmented target batch (L_consist) and
    the clean target batch (L_sce) separately and in this order, so each batch norm
    batch holds one domain and one view;
  - phi is the official one: RandAugmentMC(2, 10) (each op applied with probability
    0.5) and a black CutOut square of 0.2 x the crop width;
  - the learning rate warms up linearly (official: 400 of 90,000 iterations) and lambda
    ramps up with exp(-5 (1 - t)^2) (official: 4,000 iterations); shorter schedules use
    the same fractions.
Where we depart (measured on the toy data, README "Does it adapt?"): only the clean target
batch updates the student's batch-norm running statistics (--bn-stats target). The
official code lets all three forwards update them, so the statistics that evaluation and
the exported model use are a blend of source, augmented and clean target batches; the
augmented ones are darker and flatter than any real image (fixmatch_augment_pool's
factors are all below 1). The source and phi batches still normalise with their own batch
statistics. --bn-stats official restores the official behaviour.
The saved model keeps the running statistics of training, as the official code's does;
--bn-images N re-estimates them after the last iteration on N whole, unaugmented target
training images (common.recompute_bn_statistics); the final evaluation, model.pt and
best.pt then carry those, and the manifest keeps the mIoU before (running_bn_target_miou)
and after (target_miou). On the content-shifted toy target the re-estimate lowered 05
(README, "Self-training (05) and distillation (06)").
At every evaluation the EMA teacher's target-val mIoU is printed and logged beside the
student's, and the manifest records both.

Reads:  work/02_warmup (manifest; model.pt with --init warmup), work/01_stylize/images, work/03_maps/labels,
        work/04_stm/stm, data/cityscapes (val for evaluation)
Writes: work/05_selftrain/model.pt (final), best.pt, last.pt, log.jsonl, manifest.json

Real data (one GPU; paper: 4 source + 4 target per step, 90k iterations):
    python 05_selftrain.py --data data --work work --source gta5
  several GPUs:  torchrun --nproc_per_node 4 05_selftrain.py --batch-size 1 ...
Toy data (CPU):
    python 05_selftrain.py --init warmup --ema 0.999 --iters 200 --batch-size 4 \
        --crop 128 64 --eval-every 200 --workers 0
  (the toy data has no ImageNet weights to retrain from: from random weights the retrained
  toy student loses the classes its pseudo labels hold little of, so the demo fine-tunes
  the warm-up with the paper's lr 5e-4, lambda = 20 and EMA 0.999; README "Does it
  adapt?". The lr warm-up and lambda ramp-up take the official fractions of 200 iterations)
Table 4 ablations: --no-stm (uniform source weights), --no-consistency; Table 3: run
03_maps.py --pla centroid|confidence first (05 trains on whatever 03 wrote).
"""
import copy
import math

import torch
from torchvision.transforms.v2 import functional as TF

import common

# ============ phi: photometric RandAugment + CutOut (pixel positions never move) ============
# As the official target loader builds phi(x^t) (luyvlei/BiSMAPs data/cityscapes_dataset.py:
# RandAugmentMC(2, 10) over fixmatch_augment_pool, then one black square of side 0.2 x the
# crop width whose pixels the KL skips, `mask`): each of N ops is applied with probability
# 0.5 at a magnitude v / 10, v drawn from 1 ... M - 1, in the official op ranges. Only its
# photometric ops exist in that pool, so the teacher's clean view and the student's view
# stay pixel-aligned for the per-pixel KL of Eq. (12).
# The box's size matters: a box of half the crop's height and width (a quarter of its
# area; our first choice, from CutOut's CIFAR setting) made the student see grey-block
# edges as trucks and trains, and Eq. (12) then taught it to predict fewer vehicles
# everywhere (README, "Does it adapt?").
PHOTOMETRIC_OPS = {  # m in (0, 1): the official v / 10; factors as in fixmatch_augment_pool
    "identity": lambda x, m: x,
    "autocontrast": lambda x, m: TF.autocontrast(x),
    "equalize": lambda x, m: TF.equalize(x),
    "brightness": lambda x, m: TF.adjust_brightness(x, 0.05 + 0.9 * m),
    "color": lambda x, m: TF.adjust_saturation(x, 0.05 + 0.9 * m),
    "contrast": lambda x, m: TF.adjust_contrast(x, 0.05 + 0.9 * m),
    "sharpness": lambda x, m: TF.adjust_sharpness(x, 0.05 + 0.9 * m),
    "posterize": lambda x, m: TF.posterize(x, 4 + int(4 * m)),            # 4 ... 7 bits kept
    "solarize": lambda x, m: TF.solarize(x, 256 - int(256 * m)),          # invert above 231 ... 26
}


def rand_augment(img, n_ops=2, magnitude=10, p=0.5):
    """RandAugment (Cubuk et al.) in the official form (RandAugmentMC): n_ops ops drawn
    uniformly with replacement, each applied with probability p at magnitude v / 10,
    v uniform in 1 ... magnitude - 1. img: (3, H, W) uint8."""
    names = list(PHOTOMETRIC_OPS)
    for k in torch.randint(len(names), (n_ops,)).tolist():
        v = torch.randint(1, max(2, magnitude), ()).item()
        if torch.rand(()) < p:
            img = PHOTOMETRIC_OPS[names[k]](img, v / 10)
    return img


def cutout(img, frac=0.2, fill=0):
    """CutOut (DeVries & Taylor) as the official loader draws it: one square of side
    frac x the image width, its centre uniform over the image, clipped at the borders,
    filled with `fill` (official: black). Returns the image and keep (H, W), False in the box."""
    _, h, w = img.shape
    v = int(frac * w)
    x0 = max(0, int(torch.rand(()).item() * w - v / 2))
    y0 = max(0, int(torch.rand(()).item() * h - v / 2))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    img = img.clone()
    img[:, y0:y1, x0:x1] = fill
    keep = torch.ones(h, w, dtype=torch.bool)
    keep[y0:y1, x0:x1] = False
    return img, keep


def phi(images, n_ops=2, magnitude=10, cut=0.2):
    """phi(x^t) for a batch (B, 3, H, W) uint8 -> augmented batch and keep mask (B, H, W)."""
    out, keep = [], []
    for img in images:
        a, k = cutout(rand_augment(img, n_ops, magnitude), cut)
        out.append(a)
        keep.append(k)
    return torch.stack(out), torch.stack(keep)


# ============ the mean teacher ============
@torch.no_grad()
def ema_update(teacher, student, decay=0.999):
    """theta_t <- decay * theta_t + (1 - decay) * theta_s; buffers (BN statistics) copied,
    as the official CustomModel.ema_update does."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)
    for t, s in zip(teacher.buffers(), student.buffers()):
        t.copy_(s)


def ema_decay_for(iters, official=0.999):
    """The EMA decay whose time constant 1 / (1 - decay) is the same fraction of a schedule
    of `iters` as the official 1,000 of 90,000 iterations: 0.999 at 90,000, 1 - 1/7 = 0.857 at 600.
    An EMA teacher that barely moves within the run (0.999 over 600 iterations keeps 55% of
    its starting weights) stays the untrained network that --init retrain starts from."""
    return 1.0 - 1.0 / common.official_fraction(iters, round(1 / (1 - official)))


def ramp_up(it, length):
    """Sigmoid ramp-up exp(-5 (1 - t)^2), t = it / length (Laine & Aila; Tarvainen & Valpola)."""
    if length <= 0 or it >= length:
        return 1.0
    t = it / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


def main(argv=None):
    p = common.base_parser(__doc__, training=True)
    p.set_defaults(batch_size=4)
    g = p.add_argument_group("BiSMAP self-training (Sec. 3.5, 4.2)")
    g.add_argument("--alpha", type=float, default=0.1, help="alpha of the SCE loss, Eq. (11) (paper: 0.1)")
    g.add_argument("--beta", type=float, default=1.0, help="beta of the SCE loss, Eq. (11) (paper: 1.0)")
    g.add_argument("--lam", type=float, default=20.0,
                   help="lambda of Eq. (13) (paper Sec. 4.2: 20; the official config uses 30). It "
                        "multiplies the KL of Eq. (12) averaged over pixels AND classes, as the "
                        "official nn.KLDivLoss() does: the per-pixel KL summed over classes / C. "
                        "(With the KL summed over classes, the same weight would be lambda / C.)")
    g.add_argument("--init", default="retrain", choices=["retrain", "warmup"],
                   help="the student's starting weights: 'retrain' (default; the paper's Fig. 3b and "
                        "the official configs/gta5_st.yml: the segmentor is trained again from the "
                        "warm-up's own initialisation, 02's --weights, with a fresh head; the warm-up "
                        "model only produced the pseudo labels) or 'warmup' (fine-tune 02's trained "
                        "model, as ProDA's stage 1 does)")
    g.add_argument("--ema", type=float, default=None,
                   help="EMA smoothing of the teacher (paper: 0.999, a time constant of 1,000 of the "
                        "90,000 iterations; default: the same fraction of --iters, i.e. "
                        "1 - 1 / official_fraction(iters, 1000))")
    g.add_argument("--ramp-up", type=int, default=None,
                   help="iterations of the sigmoid ramp-up of lambda (the paper is silent; the "
                        "official code uses 4,000 of 90,000; default: the same fraction of --iters)")
    g.add_argument("--teacher-bn", default="batch", choices=["batch", "running"],
                   help="batch norm of the EMA teacher's forward: 'batch' (the official code: the "
                        "statistics of the current target batch) or 'running' (eval mode, the running "
                        "statistics copied from the student)")
    common.add_bn_stats_arg(g, "source and phi")
    g.add_argument("--ra-ops", type=int, default=2,
                   help="RandAugment N: photometric ops drawn per image, each applied with "
                        "probability 0.5 (official RandAugmentMC(2, 10))")
    g.add_argument("--ra-magnitude", type=int, default=10,
                   help="RandAugment M (2-10): magnitudes v / 10 with v drawn from 1 ... M - 1 (official: 10)")
    g.add_argument("--cutout", type=float, default=0.2,
                   help="CutOut: side of the black square, as a fraction of the crop width (official: "
                        "0.2); Eq. (12) skips its pixels")
    common.add_bn_images_arg(g)
    g.add_argument("--no-stm", action="store_true", help="uniform source weights (Table 4 without STM)")
    g.add_argument("--no-consistency", action="store_true", help="drop Eq. (12) (Table 4 rows)")
    p.set_defaults(warmup_iters=None)
    args = p.parse_args(argv)
    if args.warmup_iters is None:  # official: 400 of 90,000 (configs/gta5_st.yml lr_schedule)
        args.warmup_iters = common.official_fraction(args.iters, 400)
    if args.ramp_up is None:       # official: get_consist_weight(rampup_length=4000)
        args.ramp_up = common.official_fraction(args.iters, 4000)
    if args.ema is None:           # official: ema_update's 0.999 over 90,000 iterations
        args.ema = ema_decay_for(args.iters)
    if not 0.0 <= args.ema < 1.0:
        raise common.StageError(f"--ema: expected a decay in [0, 1), got {args.ema}")
    stage, device, rank, world = common.start(args, "05_selftrain")
    warm = stage.use("02_warmup")
    args.backbone = warm["args"]["backbone"]  # the segmentor is the warm-up model's
    maps = stage.use("03_maps")
    common.check_made_from(stage, "03_maps", "02_warmup")
    src_ds = common.source_dataset(args, stage, use_stm=not args.no_stm)
    if not args.no_stm:
        common.check_made_from(stage, "04_stm", "02_warmup")
        common.check_stm_chain(stage)  # 04's Eq. (8) from the 03 run used here
    tgt_ds = common.target_dataset(args, common.stage_dir(args.work, "03_maps") / "labels", "03_maps")
    val = common.target_val_items(args.data)
    # ============ the student (--init); before begin(), so a failing load or download ============
    # leaves a finished 05 run as it is
    if args.init == "warmup":  # fine-tune 02's trained network
        init = common.stage_dir(args.work, "02_warmup") / "model.pt"
        stage.add_input(init)
        model, _ = common.model_from_checkpoint(init, device, "02_warmup")
    else:  # retrain from 02's own initialisation (official gta5_st.yml: resume_flag False,
        # pretrained True, i.e. CustomModel.setup's ImageNet backbone and a fresh head)
        model = common.build_model(args.backbone, warm["args"]["weights"]).to(device)
    model.train()
    resuming = stage.begin(check=[src_ds, tgt_ds, val])

    ddp = common.wrap_ddp(model, device)
    # after wrap_ddp: each rank drew its own random head (start() seeds ranks apart), DDP
    # has now broadcast rank 0's weights, and every rank's teacher must copy those
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    loaders = None
    side_frozen = args.bn_stats == "target"  # only the clean target forward moves the running statistics

    def step_loss(it):
        nonlocal loaders
        if loaders is None:
            loaders = [common.infinite_loader(ds, args.batch_size, args.workers, args.seed + k,
                                              rank, world, start_epoch=args._start_iter)
                       for k, ds in enumerate((src_ds, tgt_ds))]
        s, t = next(loaders[0]), next(loaders[1])
        # ---- source: Eq. (10), its own forward ----
        xs = common.normalize(s["image"].to(device))                      # (B, 3, H, W)
        ys = s["label"].to(device)                                        # (B, H, W)
        ws = None if args.no_stm else s["stm"].to(device).float() / 255   # (B, H, W) in [0, 1]
        with common.frozen_bn_statistics(model, side_frozen):  # --bn-stats target: leave them alone
            ls = ddp(xs)[1]
        loss_ce = common.weighted_ce(common.upsample(ls, ys.shape[-2:]), ys, ws)  # Eq. (10)
        # ---- target: the official order (CustomModel.step, adaptation_model.py lines 144-177):
        # teacher on the clean view, student on phi(view), then the student on the clean view
        # last (with --bn-stats official the last forward weighs most in the running statistics).
        xt_u8 = t["image"]                                                # (B, 3, H, W) uint8
        xt = common.normalize(xt_u8.to(device))                           # the clean view
        yt = t["label"].to(device)
        # ---- phi(view) against the teacher on the clean view: Eq. (12) ----
        if args.no_consistency:
            loss_cons = torch.zeros((), device=device)
        else:
            xa_u8, keep = phi(xt_u8, args.ra_ops, args.ra_magnitude, args.cutout)
            lteach = common.upsample(common.teacher_forward(teacher, xt, args.teacher_bn)[1], yt.shape[-2:])
            with common.frozen_bn_statistics(model, side_frozen):
                la = common.upsample(ddp(common.normalize(xa_u8.to(device)))[1], yt.shape[-2:])
            mask = keep.to(device) & t["valid"].to(device)
            loss_cons = common.kl_divergence(lteach, la, mask)  # Eq. (12)
        # ---- clean view: Eq. (11), its own forward ----
        lt = common.upsample(ddp(xt)[1], yt.shape[-2:])
        loss_sce = common.symmetric_ce(lt, yt, args.alpha, args.beta)  # Eq. (11)
        lam = 0.0 if args.no_consistency else args.lam * ramp_up(it, args.ramp_up)
        loss = loss_ce + loss_sce + lam * loss_cons  # Eq. (13)
        return loss, {"loss": loss.item(), "ce": loss_ce.item(), "sce": loss_sce.item(),
                      "consist": loss_cons.item(), "lambda": lam}

    def after_step(it):
        if not args.no_consistency:
            ema_update(teacher, model, args.ema)

    extra = {"teacher": (teacher.state_dict, lambda sd: teacher.load_state_dict(sd))}
    bn_items = common.bn_images(common.target_train_items(args.data), args.bn_images)
    final, best, state = common.train_loop(
        args, stage.dir, model, step_loss, val, extra_state=extra, after_step=after_step,
        resume=resuming, also_eval=None if args.no_consistency else {"teacher": teacher},
        bn_items=bn_items)
    if rank == 0:
        common.save_checkpoint(stage.dir / "model.pt", **state)
        stage.finish({"target_miou": final["miou"], "teacher_target_miou": final.get("teacher_miou"),
                      "bn_images": len(bn_items),
                      "running_bn_target_miou": final.get("running_bn_miou"),
                      "teacher_running_bn_target_miou": final.get("teacher_running_bn_miou"),
                      "target": final, "best": best,
                      "warmup_target_miou": warm["summary"]["target_miou"],
                      "init": args.init, "ema": args.ema,
                      "pla": maps["args"].get("pla", "maps"), "stm": not args.no_stm,
                      "consistency": not args.no_consistency})
        teach = f", EMA teacher {final['teacher_miou']:.1f}" if "teacher_miou" in final else ""
        if "running_bn_miou" in final:
            teach += (f"; batch norm statistics re-estimated on {len(bn_items)} target images, "
                      f"{final['running_bn_miou']:.1f} with those of training")
        print(f"05_selftrain: target val mIoU {final['miou']:.1f}{teach} (warm-up "
              f"{warm['summary']['target_miou']:.1f}; best {best['miou']:.1f} at iteration "
              f"{best.get('iteration')}) -> {stage.dir / 'model.pt'}")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)

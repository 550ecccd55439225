"""02_warmup.py: the warm-up stage (BiSMAP Sec. 3.5, Eq. (2)). DeepLabV3+ is trained with
cross-entropy on the GPA-stylized source; this is the paper's GPA baseline (Table 1/2,
"GPA(baseline)": 46.3 mIoU on GTA5 -> Cityscapes, 49.3 (13 classes) on SYNTHIA).

Reads:  work/01_stylize/images (or the raw source with --source-images raw),
        data/cityscapes/leftImg8bit/val + gtFine/val for evaluation
Writes: work/02_warmup/model.pt (final weights: what later stages use, since picking a
        checkpoint by target-val mIoU would use target labels that unsupervised
        adaptation does not have), best.pt (best target-val mIoU, for comparison with the
        paper, whose official code picks it), last.pt (resume), log.jsonl, manifest.json

Real data (one GPU; paper schedule: batch 8, 90k iterations, crop 896x512):
    python 02_warmup.py --data data --work work --source gta5
  several GPUs:  torchrun --nproc_per_node 4 02_warmup.py --batch-size 2 ...
Toy data (CPU, 10-20 minutes; demo.py's flags: from random weights the toy warm-up
needs a larger learning rate than the paper's 5e-4, which fine-tunes ImageNet weights, and
one lr for every layer: the paper's 10x for the head is for a fresh head on a pre-trained
backbone):
    python 02_warmup.py --backbone resnet18 --weights none --iters 600 --lr 0.03 \
        --head-lr-mult 1 --batch-size 8 --crop 128 64 --eval-every 600 --workers 0
"""
import common
import torch.distributed as dist
import torch.nn.functional as F


def main(argv=None):
    p = common.base_parser(__doc__, training=True)
    p.add_argument("--weights", default="imagenet",
                   help="backbone init: imagenet (torchvision weights, downloaded once), none, or a "
                        "state-dict path (paper: ImageNet, Sec. 4.2)")
    p.add_argument("--source-images", default="stylized", choices=["stylized", "raw"],
                   help="train on 01's GPA-stylized source (paper) or the raw source (GPA ablation)")
    p.add_argument("--source-eval", type=int, default=100,
                   help="source training images evaluated at the end (the source mIoU; 0: skip)")
    args = p.parse_args(argv)
    stage, device, rank, world = common.start(args, "02_warmup")
    items, image_for = common.stylized_source(args, stage, raw=args.source_images == "raw")
    val = common.target_val_items(args.data)

    # ============ data and model (before begin(): a failure here leaves the folder as it is) ============
    ds = common.SegDataset(items, common.label_kind(args.source), crop=tuple(args.crop),
                           scale=tuple(args.scale), jitter=args.jitter, image_for=image_for,
                           base=common.base_resize(args, args.source))
    model = common.build_model(args.backbone, args.weights).to(device)
    resuming = stage.begin(check=[ds, val])
    ddp = common.wrap_ddp(model, device)
    loader = None

    def step_loss(it):
        nonlocal loader
        if loader is None:  # built on first use so a resumed run draws fresh batches
            loader = common.infinite_loader(ds, args.batch_size, args.workers, args.seed,
                                            rank, world, start_epoch=args._start_iter)
        b = next(loader)
        x = common.normalize(b["image"].to(device, non_blocking=True))   # (B, 3, H, W)
        y = b["label"].to(device, non_blocking=True)                     # (B, H, W)
        _, logits = ddp(x)                                               # (B, C, H/4, W/4)
        logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = common.weighted_ce(logits, y)  # Eq. (2): plain cross-entropy on the source
        return loss, {"loss_ce": loss.item()}

    # ============ training (shared schedule: SGD, poly, AMP, eval, checkpoints) ============
    final, best, state = common.train_loop(args, stage.dir, model, step_loss, val, resume=resuming)
    src = {}
    # a finished run rerun with the same arguments holds the same model: its source figures
    # stand (rank 0 read its manifest; every rank evaluates, or none)
    kept = (stage.earlier.get("summary") or {}).get("source") or None if rank == 0 else None
    if world > 1:
        box = [kept]
        dist.broadcast_object_list(box, src=0)
        kept = box[0]
    if args.source_eval > 0 and kept:
        src = kept
        common.log0(f"02_warmup: source mIoU {src['miou']:.1f} on {args.source_eval} training images, "
                    f"from the finished run's manifest")
    elif args.source_eval > 0:
        cm = common.evaluate(model, items[: args.source_eval], common.label_kind(args.source), device,
                             args.source, rank=rank, world=world, desc="source eval",
                             image_for=image_for)
        src = common.summarize_iou(cm, args.source)
        common.log0(common.iou_table(cm, args.source, f"source ({args.source}) training images"))
    if rank == 0:
        common.save_checkpoint(stage.dir / "model.pt", **state)
        stage.finish({"target_miou": final["miou"], "target": final, "best": best,
                      "source_miou": src.get("miou"), "source": src, "images": len(items)})
        print(f"02_warmup: target val mIoU {final['miou']:.1f} (best {best['miou']:.1f} at "
              f"iteration {best.get('iteration')}), source mIoU {src.get('miou', float('nan')):.1f} "
              f"-> {stage.dir / 'model.pt'}")
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)

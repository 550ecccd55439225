"""01_stylize.py: Global Photometric Alignment (GPA; Ma et al., CVPR 2021), which the
paper uses to restyle the source toward the target before every later stage
(BiSMAP Sec. 3.5 and 4.2; GPA is also the paper's baseline, Table 1/2 "GPA").

For each source image a random Cityscapes training image is the reference:
  1. both go to CIELAB (sRGB, D65);
  2. the a and b channels of the source are histogram-matched to the reference's;
  3. lightness gets a gamma, L' = L^gamma with L in [0, 1], where gamma minimises
     (mean(L^gamma) - mean(L_ref))^2 + 0.01 (gamma - 1)^2 (a gamma regularised toward 1);
  4. back to sRGB, written with the source's file name. Labels are untouched.

Reads:  data/GTA5/images (or SYNTHIA/RAND_CITYSCAPES/RGB), data/cityscapes/leftImg8bit/train
Writes: work/01_stylize/images/<source name>.png, previews/*.png (source | reference |
        stylized), manifest.json (reference chosen for every image, gamma statistics)

    python 01_stylize.py --data data --work work --source gta5 --workers 8   # real data
    python 01_stylize.py --data data --work work --workers 0                 # toy data
Deterministic given --seed; a killed run resumes without redoing finished images.
"""
import multiprocessing as mp

import numpy as np
from scipy.optimize import minimize_scalar
from PIL import Image
import torch
from tqdm import tqdm

import common

# ============ colour conversion: sRGB (D65) <-> CIELAB ============
_M_RGB2XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                       [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
_M_XYZ2RGB = np.linalg.inv(_M_RGB2XYZ)
_WHITE = np.array([0.95047, 1.0, 1.08883])  # D65 reference white
_EPS, _KAPPA = 216 / 24389, 24389 / 27


def rgb_to_lab(rgb):
    """(..., 3) uint8 or float in [0, 1] sRGB -> (..., 3) float64 L in [0, 100], a, b."""
    c = np.asarray(rgb, np.float64)
    if np.asarray(rgb).dtype == np.uint8:
        c = c / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = lin @ _M_RGB2XYZ.T / _WHITE
    f = np.where(xyz > _EPS, np.cbrt(xyz), (_KAPPA * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_rgb(lab):
    """(..., 3) CIELAB -> (..., 3) float sRGB in [0, 1] (clipped)."""
    lab = np.asarray(lab, np.float64)
    fy = (lab[..., 0] + 16) / 116
    fx = fy + lab[..., 1] / 500
    fz = fy - lab[..., 2] / 200
    f = np.stack([fx, fy, fz], -1)
    xyz = np.where(f ** 3 > _EPS, f ** 3, (116 * f - 16) / _KAPPA) * _WHITE
    lin = np.clip(xyz @ _M_XYZ2RGB.T, 0, 1)
    return np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin ** (1 / 2.4) - 0.055).clip(0, 1)


# ============ the GPA steps, each a small pure function ============
QUANTILES = np.linspace(0, 1, 1025)


def reference_stats(ref_rgb):
    """What GPA needs of a reference: the a and b quantile functions and the mean L in [0, 1]."""
    lab = rgb_to_lab(ref_rgb).reshape(-1, 3)
    return {"a": np.quantile(lab[:, 1], QUANTILES), "b": np.quantile(lab[:, 2], QUANTILES),
            "L_mean": float(lab[:, 0].mean() / 100)}


def match_histogram(src, ref_quantiles):
    """Map src values so their distribution follows the reference quantile function.
    Each value goes to the reference quantile at its own mid-rank (ties share a rank)."""
    flat = src.ravel()
    vals, inv, counts = np.unique(flat, return_inverse=True, return_counts=True)
    q = (np.cumsum(counts) - 0.5 * counts) / flat.size        # mid-rank quantile of each value
    return np.interp(q, QUANTILES, ref_quantiles)[inv].reshape(src.shape)


def fit_gamma(L, L_ref_mean, reg=0.01):
    """gamma = argmin (mean(L^gamma) - mean(L_ref))^2 + reg (gamma - 1)^2, L in [0, 1]."""
    L = np.clip(L.ravel(), 0, 1)
    if L.size > 200000:  # the objective only needs the mean: a fixed subsample suffices
        L = L[:: L.size // 200000 + 1]

    def obj(g):
        return (np.mean(L ** g) - L_ref_mean) ** 2 + reg * (g - 1) ** 2
    return float(minimize_scalar(obj, bounds=(0.1, 10.0), method="bounded",
                                 options={"xatol": 1e-6}).x)


def gpa(src_rgb, ref, gamma_reg=0.01):
    """Global Photometric Alignment of one uint8 image toward a reference's statistics."""
    lab = rgb_to_lab(src_rgb)
    out = np.empty_like(lab)
    out[..., 1] = match_histogram(lab[..., 1], ref["a"])
    out[..., 2] = match_histogram(lab[..., 2], ref["b"])
    L = lab[..., 0] / 100
    gamma = fit_gamma(L, ref["L_mean"], gamma_reg)
    out[..., 0] = 100 * np.clip(L, 0, 1) ** gamma
    rgb = lab_to_rgb(out)
    return (rgb * 255 + 0.5).astype(np.uint8), gamma


# ============ the stage ============
_REF_CACHE = {}
REPLACEMENTS = 8  # spare references per image, used only when a reference cannot be decoded


def _reference(candidates):
    """Statistics of the first readable reference among the candidates (the drawn one,
    then deterministic replacements). Returns (path, stats, [unreadable references])."""
    bad = []
    for ref_path in map(str, candidates):
        if ref_path not in _REF_CACHE:
            if len(_REF_CACHE) > 512:
                _REF_CACHE.clear()
            try:
                _REF_CACHE[ref_path] = reference_stats(common.read_image(ref_path))
            except common.DataError as e:
                _REF_CACHE[ref_path] = str(e)
        if isinstance(_REF_CACHE[ref_path], str):
            bad.append(_REF_CACHE[ref_path])
            continue
        return ref_path, _REF_CACHE[ref_path], bad
    return None, None, bad


def _work_one(job):
    """Stylize one image (runs in a worker process). Returns (name, gamma, error, reference
    used, unreadable references): a corrupt reference is replaced by the next candidate; a
    corrupt source image is an error (01 records it as excluded)."""
    src, candidates, out, gamma_reg = job
    name = common.item_name(src)
    try:
        img = common.read_image(src)
    except common.DataError as e:
        return name, None, str(e), None, []
    ref_path, stats, bad = _reference(candidates)
    if stats is None:
        return name, None, f"no readable reference image among {len(candidates)} tried", None, bad
    out_img, gamma = gpa(img, stats, gamma_reg)
    common.save_png(out, out_img)
    return name, gamma, None, ref_path, bad


def main(argv=None):
    p = common.base_parser(__doc__)
    p.add_argument("--gamma-reg", type=float, default=0.01,
                   help="weight of (gamma-1)^2 in the lightness fit (GPA's setting: 0.01)")
    p.add_argument("--previews", type=int, default=4, help="side-by-side previews to write")
    args = p.parse_args(argv)
    rank, world = common.setup_distributed(args.device)
    stage = common.Stage(args, "01_stylize")
    sources = common.source_items(args.data, args.source, check_sizes=False)
    targets = common.target_train_items(args.data)
    resuming = stage.begin()
    # one reference per source image, drawn once so resumed and sharded runs agree; then
    # REPLACEMENTS more per image, tried in order when a reference cannot be decoded
    rng = np.random.default_rng(args.seed)
    refs = rng.integers(len(targets), size=len(sources))
    spare = rng.integers(len(targets), size=(len(sources), REPLACEMENTS))
    out_dir = stage.dir / "images"
    jobs = [(s, [targets[r][0]] + [targets[k][0] for k in more], out_dir / common.item_name(s),
             args.gamma_reg) for (s, _), r, more in zip(sources, refs, spare)]
    todo = [j for j in jobs[rank::world] if not (resuming and j[2].exists())]
    if resuming:
        common.log0(f"resuming: {len(jobs) - len(todo)} of {len(jobs)} images already stylized")
    gammas, excluded, used, bad_refs = [], {}, {}, set()
    pool = mp.get_context("spawn").Pool(args.workers) if args.workers > 0 else None
    it = pool.imap(_work_one, todo, chunksize=4) if pool else map(_work_one, todo)
    for name, gamma, err, ref, bad in tqdm(it, total=len(todo), desc="GPA", disable=rank != 0):
        for b in bad:
            if b not in bad_refs:
                tqdm.write(f"warning: unreadable reference replaced by another: {b}")
            bad_refs.add(b)
        if err:
            excluded[name] = err
            tqdm.write(f"excluded: {err}")
        else:
            gammas.append(gamma)
            used[name] = ref
    if pool:
        pool.close()
        pool.join()
    if world > 1:  # every rank's findings go to rank 0's manifest
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (gammas, excluded, used, sorted(bad_refs)))
        gammas = [g for p in parts for g in p[0]]
        excluded = {k: v for p in parts for k, v in p[1].items()}
        used = {k: v for p in parts for k, v in p[2].items()}
        bad_refs = {b for p in parts for b in p[3]}
    common.barrier()
    if rank == 0:
        # the reference of each image: the one used in this run; for an image written by an
        # interrupted earlier run, the first candidate (a replacement then is not recorded)
        refs_used = {common.item_name(j[0]): used.get(common.item_name(j[0]), str(j[1][0]))
                     for j in jobs if j[2].exists()}
        for s, _, out, _ in jobs[: args.previews]:
            if not out.exists():
                continue
            try:
                a, c = common.read_image(s), common.read_image(out)
                b = common.read_image(refs_used[common.item_name(s)])
            except common.DataError:  # an unreadable reference of an earlier run: no preview
                continue
            b = np.asarray(Image.fromarray(b).resize((a.shape[1], a.shape[0])))
            common.save_png(stage.dir / "previews" / common.item_name(s), np.concatenate([a, b, c], 1))
        written = sum(1 for j in jobs if j[2].exists())
        summary = {"images": len(jobs), "written": written, "excluded": len(excluded),
                   "unreadable_references": sorted(bad_refs),
                   "gamma_mean_this_run": float(np.mean(gammas)) if gammas else None}
        # excluded: source images that cannot be decoded; 02-06 skip them (stylized_source)
        stage.finish(summary, references=refs_used,
                     excluded={n: e for n, e in excluded.items() if not (out_dir / n).exists()})
        print(f"01_stylize: {written}/{len(jobs)} source images stylized toward Cityscapes -> "
              f"{out_dir}" + (f" ({len(excluded)} unreadable source image(s) excluded, listed in "
                              f"{stage.dir / 'manifest.json'}; later stages skip them)" if excluded else ""))
    common.cleanup_distributed()


if __name__ == "__main__":
    common.run_main(main)

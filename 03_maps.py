"""Stage 3 - Multiple Anisotropic Prototypes (MAPs) and target pseudo labels (paper Sec. 3.3).

Forward direction of BiSMAP. The frozen warm-up segmentor E (02_warmup.py) runs over the
GPA-stylized source; per class c it keeps the decoder features of correctly classified
pixels, Lambda_c (Eq. (3)), an unbiased sample of at most 300,000 per class (Sec. 4.2);
it fits one Gaussian mixture of K = 8 diagonal Gaussians per class by EM (Eq. (4)-(5));
then every target training image gets the pseudo label argmax_c p_c(f) where
max_c p_c(f) >= delta, else 255 (Eq. (6)), with the features upsampled to the image size
(footnote 1). `--pla centroid|confidence` gives the paper's Table 3 baselines (CAs-PLA,
IAS-PLA) in the same artifact format. `--bn-images N` normalises each domain's features
with batch-norm statistics re-estimated on N whole images of that domain (default 0: the
warm-up's running statistics, as the official code).

Reads:  work/02_warmup/model.pt, manifest.json     (the warm-up segmentor E, G = F o E)
        work/01_stylize/images/<source image>       (stylized source, not for --pla confidence)
        data/<source>/ labels, data/cityscapes/leftImg8bit/train (+ gtFine/train for the report)
Writes: work/03_maps/
        gmm.npz             weights (C,K), means (C,K,D), variances (C,K,D), present (class ids),
                            n_components, source_seen / source_sampled counts, class_means (--pla maps)
        centroids.npz       class_means (C,D), present (--pla centroid)
        labels/<target image name>.png   pseudo labels, trainIds, 255 = ignore (palette PNG)
        previews/<name>.png image + pseudo-label overlay | pseudo label | ground truth
        calibration.json    the threshold chosen for --target-ratio (reused on resume)
        report.json, manifest.json   PL ratio, accuracy, per-class IoU (paper Table 5 view),
                            delta, per-class counts, the target image list digest

Commands:
    # real data (GTA5 -> Cityscapes, paper setting: K=8, 300,000 features per class, delta=100)
    python 03_maps.py --data data --work work
    python 03_maps.py --data data --work work --source synthia          # delta = -50
    torchrun --nproc_per_node 4 03_maps.py --data data --work work      # images sharded over GPUs
    # the Table 3 baselines at the same pseudo-label ratio as MAPs; they write the same
    # work/03_maps/ files (replacing MAPs'), so copy the work folder to keep both
    cp -r work work_cas && python 03_maps.py --data data --work work_cas --pla centroid --target-ratio 0.44
    # toy data (delta depends on the feature scale: pick it by the pseudo-label ratio)
    python toy_data.py --data toy && python 01_stylize.py --data toy --work toywork
    python 02_warmup.py --data toy --work toywork --backbone resnet18 --weights none --iters 300 \
        --lr 0.03 --head-lr-mult 1 --batch-size 4 --crop 128 64 --eval-every 300 --workers 0
    python 03_maps.py --data toy --work toywork --target-ratio 0.5 --workers 0
    cp -r toywork toywork_cas
    python 03_maps.py --data toy --work toywork_cas --pla centroid --target-ratio 0.5 --workers 0
"""
import argparse
import copy
import json
import math
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import (CLASSES, IGNORE, NUM_CLASSES, DataError, LabelTally, SegDataset, Stage,
                    StageError, autocast, barrier, bn_images, image_loader, base_parser,
                    cleanup_distributed, colorize, decode_label, item_name, items_digest,
                    label_kind, log0, model_from_checkpoint, need, normalize, overlay,
                    pick_device, save_json, save_npz, save_png, seed_everything,
                    setup_distributed, stage_dir, recompute_bn_statistics, run_main,
                    stylized_source, target_ground_truth, target_train_items)

DEFAULT_DELTA = {"gta5": 100.0, "synthia": -50.0}  # Sec. 4.2
LOG_2PI = math.log(2 * math.pi)


# ============================================================================
# Eq. (3): an unbiased sample of each class's correctly classified source features
# ============================================================================
class Reservoir:
    """Algorithm R (Vitter 1985), vectorised: after `seen` offered rows, `data` holds a
    uniform random sample (without replacement) of min(seen, capacity) of them.

    Item i (0-based, over the whole stream) replaces slot j ~ U{0..i} if j < capacity.
    The draws do not depend on the reservoir's content, so a batch is processed at once;
    a slot hit twice within a batch keeps the later item, exactly as the sequential
    algorithm would. Storage is float16 on the CPU and grows with the rows kept, so
    memory is bounded by capacity * D * 2 bytes per class, never by the dataset size."""

    def __init__(self, capacity, dim, rng):
        self.capacity, self.dim, self.rng = int(capacity), int(dim), rng
        self.data = torch.empty(0, self.dim, dtype=torch.float16)
        self.n = 0          # rows filled
        self.seen = 0       # rows offered

    def _grow(self, need_rows):
        if need_rows > self.data.shape[0]:
            rows = min(self.capacity, max(need_rows, 2 * self.data.shape[0], 1024))
            new = torch.empty(rows, self.dim, dtype=torch.float16)
            new[:self.n] = self.data[:self.n]
            self.data = new

    def offer(self, feats):
        """feats: (m, D) tensor on any device; only the rows kept are copied to the CPU."""
        m = feats.shape[0]
        if m == 0:
            return
        fill = min(max(self.capacity - self.seen, 0), m)
        if fill:
            self._grow(self.n + fill)
            self.data[self.n:self.n + fill] = feats[:fill].to("cpu", torch.float16)
            self.n += fill
        rest = m - fill
        if rest:
            i = np.arange(self.seen + fill, self.seen + m)      # global stream index of each row
            j = self.rng.integers(0, i + 1)                      # slot drawn uniformly in 0..i
            hit = np.nonzero(j < self.capacity)[0]
            if hit.size:
                slots, pos = j[hit][::-1], (hit + fill)[::-1]   # reversed: first = latest
                slots, first = np.unique(slots, return_index=True)
                pos = torch.from_numpy(np.ascontiguousarray(pos[first])).to(feats.device)
                self.data[torch.from_numpy(slots)] = feats[pos].to("cpu", torch.float16)
        self.seen += m

    def sample(self):
        return self.data[:self.n]


def merge_reservoirs(parts, capacity, rng):
    """Merge reservoirs of disjoint streams into one uniform sample of their union.

    parts: [(sample (n_r, D), seen_r)]. How many rows come from each part follows the
    multivariate hypergeometric law of drawing `capacity` rows from the union (weights =
    rows seen, not rows kept); within a part, a uniform subset of a uniform sample is a
    uniform sample. Returns (sample (min(capacity, sum seen), D), sum seen)."""
    seen = np.array([int(s) for _, s in parts], dtype=np.int64)
    total = int(seen.sum())
    if total <= capacity:
        return torch.cat([p for p, _ in parts]) if parts else None, total
    take = rng.multivariate_hypergeometric(seen, capacity)
    out = [p[torch.from_numpy(rng.choice(p.shape[0], size=int(t), replace=False))]
           for (p, _), t in zip(parts, take) if t > 0]
    return torch.cat(out), total


@torch.no_grad()
def collect_source_features(model, items, image_for, kind, capacity, device, amp, workers, seed,
                            rank=0, world=1):
    """Eq. (3): Lambda_c = {f_i | argmax G(x)_i = c, y_i = c}, sampled per class.

    The model runs at the source image resolution (no crop); features (B, D, H/4, W/4)
    are compared with the label resized to that grid by nearest neighbour. Returns
    (reservoirs [C], feature sums (C, D) float64, correct-pixel counts (C,))."""
    ds = SegDataset(items, kind, crop=None, scale=None, flip=False, image_for=image_for)
    mine = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
    loader = torch.utils.data.DataLoader(mine, batch_size=1, shuffle=False, num_workers=workers)
    rng = np.random.default_rng([seed, rank])
    res, sums, counts = None, None, torch.zeros(NUM_CLASSES, dtype=torch.int64)
    for batch in tqdm(loader, desc="source features (Eq. 3)", disable=rank != 0):
        img = batch["image"].to(device)                               # (1, 3, H, W) uint8
        lab = batch["label"].to(device)                               # (1, H, W)
        with autocast(device, amp):
            feat, logits = model(normalize(img))                      # (1, D, h, w), (1, C, h, w)
        if res is None:
            d = feat.shape[1]
            res = [Reservoir(capacity, d, rng) for _ in range(NUM_CLASSES)]
            sums = torch.zeros(NUM_CLASSES, d, dtype=torch.float64, device=device)
            counts = counts.to(device)
        lab = F.interpolate(lab[:, None].float(), size=feat.shape[-2:], mode="nearest")[:, 0].long()
        correct = logits.argmax(1) == lab                             # Eq. (3); 255 never matches
        f = feat.permute(0, 2, 3, 1)[correct]                         # (m, D)
        cls = lab[correct]                                            # (m,)
        sums.index_add_(0, cls, f.double())
        counts += torch.bincount(cls, minlength=NUM_CLASSES)
        for c in cls.unique().tolist():
            res[c].offer(f[cls == c])
    if res is None:
        raise DataError(f"no source images to process on rank {rank} of {world}")
    return res, sums.cpu(), counts.cpu()


# ============================================================================
# Eq. (4)-(5): one mixture of K diagonal Gaussians per class, fitted by EM
# ============================================================================
def gaussian_terms(weights, means, variances):
    """The expanded quadratic form of Eq. (5): log(pi_k N_k(f)) = [f, f^2] @ W + b.

    weights (M,), means (M, D), variances (M, D), float64. Returns W (2D, M), b (M,):
    W = [mu / var ; -1 / (2 var)], b = log pi - (D log 2pi + sum log var + sum mu^2 / var) / 2.
    A component of weight 0 gets b = -inf (it never contributes)."""
    prec = 1.0 / variances                                            # (M, D)
    W = torch.cat([means * prec, -0.5 * prec], 1).T                   # (2D, M)
    b = torch.log(weights) - 0.5 * (means.shape[1] * LOG_2PI + torch.log(variances).sum(1)
                                    + (means * means * prec).sum(1))  # (M,)
    return W, b


@dataclass
class GMM:
    weights: torch.Tensor      # (K,) float64
    means: torch.Tensor        # (K, D)
    variances: torch.Tensor    # (K, D)
    log_likelihood: float      # mean log p(f) per sample at the last E-step
    n_iter: int
    converged: bool
    init: tuple                # (weights, means, variances) the EM started from
    init_seconds: float = 0.0  # time spent in k-means++ / Lloyd (0 when init was given)


def _sq_dist(x, x2, centers):
    """Squared distances (n, k) via ||x||^2 - 2 x.c + ||c||^2 (clamped at 0)."""
    c2 = (centers * centers).sum(1)                                   # (k,)
    return torch.addmm(x2[:, None] + c2[None], x, centers.T, alpha=-2).clamp_min_(0)


def kmeans_pp(x, k, gen, chunk=1 << 17):
    """Greedy k-means++ seeding (as scikit-learn: 2 + log k candidates per step). x (n, D)."""
    n = x.shape[0]
    x2 = (x * x).sum(1)
    trials = 2 + int(math.log(k))

    def draw(weights, m):
        cdf = torch.cumsum(weights.double(), 0)
        if cdf[-1] <= 0:                                              # all points coincide
            return torch.randint(n, (m,), generator=gen).to(x.device)
        u = torch.rand(m, generator=gen, dtype=torch.float64).to(x.device) * cdf[-1]
        return torch.searchsorted(cdf, u).clamp_(max=n - 1)

    centers = x[draw(torch.ones(n, device=x.device), 1)]             # (1, D)
    d2 = torch.cat([_sq_dist(x[i:i + chunk], x2[i:i + chunk], centers)[:, 0]
                    for i in range(0, n, chunk)])                     # (n,)
    for _ in range(1, k):
        cand = draw(d2, trials)
        dc = torch.cat([_sq_dist(x[i:i + chunk], x2[i:i + chunk], x[cand])
                        for i in range(0, n, chunk)])                 # (n, trials)
        best = torch.minimum(d2[:, None], dc).sum(0, dtype=torch.float64).argmin()
        d2 = torch.minimum(d2, dc[:, best])
        centers = torch.cat([centers, x[cand[best]][None]])
    return centers


def nearest(x, x2, centers, chunk=1 << 17):
    """(labels (n,), squared distance to the nearest centre (n,)), in chunks."""
    out = [_sq_dist(x[i:i + chunk], x2[i:i + chunk], centers).min(1) for i in range(0, len(x), chunk)]
    return torch.cat([o.indices for o in out]), torch.cat([o.values for o in out])


def kmeans(x, k, gen, max_iter=100, tol=1e-4, chunk=1 << 17):
    """Lloyd's k-means from k-means++ seeds; stops when the centres move less than
    tol * mean feature variance (scikit-learn's rule). Returns (centres (k, D), inertia)."""
    n, d = x.shape
    x2 = (x * x).sum(1)
    centers = kmeans_pp(x, k, gen, chunk)
    mean = (x.new_ones(n) @ x) / n                                    # (D,) (a product: column sums are slow)
    tol = tol * (x2.mean() - (mean * mean).sum()).item() / d          # tol * mean feature variance
    for _ in range(max_iter):
        labels, dist = nearest(x, x2, centers, chunk)                 # (n,), (n,)
        sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
        for i in range(0, n, chunk):
            onehot = F.one_hot(labels[i:i + chunk], k).to(x.dtype)    # (m, k)
            sums += (onehot.T @ x[i:i + chunk]).double()
        cnt = torch.bincount(labels, minlength=k).double()
        new = (sums / cnt.clamp_min(1)[:, None]).to(x.dtype)
        empty = cnt == 0
        if empty.any():   # relocate empty clusters to the points farthest from their centre
            new[empty] = x[dist.topk(int(empty.sum())).indices]
        shift = ((new - centers) ** 2).sum().item()
        centers = new
        if shift <= tol:
            break
    return centers, nearest(x, x2, centers, chunk)[1].sum(dtype=torch.float64).item()


def kmeans_labels(x, k, gen, n_init=3, sample=1 << 16, chunk=1 << 17):
    """The initial partition for EM: the best (lowest inertia) of n_init k-means runs on a
    uniform subsample of `sample` rows, then every row labelled by its nearest centre.

    Departs from scikit-learn's 'kmeans' init (one k-means on all rows, up to 300 Lloyd
    iterations): on 300,000 x 256 features that one run was seen creeping for 300
    iterations while two clusters traded a few points per step; EM refines the partition
    anyway, and several cheap runs on a subsample find a better optimum more often."""
    n = len(x)
    xs = x[torch.randperm(n, generator=gen)[:sample].to(x.device)] if n > sample else x
    runs = [kmeans(xs, k, gen, chunk=chunk) for _ in range(n_init)]
    centers = min(runs, key=lambda r: r[1])[0]
    return nearest(x, (x * x).sum(1), centers, chunk)[0]


def _m_step(nk, s, n, d, reg_covar):
    """Eq. (4)-(5) M-step from sufficient statistics nk (K,), s = sum_i r_ik [f_i, f_i^2] (K, 2D)."""
    nk = nk + 10 * torch.finfo(torch.float64).eps                     # as scikit-learn
    means = s[:, :d] / nk[:, None]
    variances = (s[:, d:] / nk[:, None] - means * means).clamp_min(0) + reg_covar  # covariance floor
    return nk / nk.sum(), means, variances


def _e_step(z, weights, means, variances, chunk):
    """One pass over z = [f, f^2]: mean log-likelihood and the statistics for the M-step."""
    n, d = z.shape[0], z.shape[1] // 2
    W, b = gaussian_terms(weights, means, variances)
    W = W.to(z.dtype)
    ll = torch.zeros((), dtype=torch.float64, device=z.device)
    nk = torch.zeros(len(weights), dtype=torch.float64, device=z.device)
    s = torch.zeros(len(weights), 2 * d, dtype=torch.float64, device=z.device)
    for i in range(0, n, chunk):
        zc = z[i:i + chunk]                                           # (m, 2D)
        lp = (zc @ W).double() + b                                    # (m, K)  log pi_k N_k, Eq. (5)
        mx = lp.amax(1, keepdim=True)                                 # (m, 1)
        r = lp.sub_(mx).clamp_min_(-700.0).exp_()                     # (m, K)  (see logsumexp_)
        tot = r.sum(1, keepdim=True)
        ll += (torch.log(tot) + mx).sum()                             # sum_i log p(f_i), Eq. (4)
        r /= tot                                                      # (m, K)  responsibilities
        nk += r.sum(0)
        s += (r.to(z.dtype).T @ zc).double()                          # (K, 2D)
    return ll.item() / n, nk, s


@torch.no_grad()
def fit_gmm(x, k, tol=1e-3, max_iter=100, reg_covar=1e-6, init=None, seed=0, chunk=1 << 16):
    """Eq. (4)-(5): a K-component diagonal Gaussian mixture fitted to x (n, D) by EM.

    Runs on x's device in float32 matrix products with float64 accumulation (the
    log-likelihood, the sufficient statistics, the parameters). The data are centred on
    their mean first, which keeps the expanded quadratic form accurate in float32.
    init: (weights (K,), means (K, D), variances (K, D)) to start from; default: one M-step
    on a k-means partition (scikit-learn's 'kmeans' init; see kmeans_labels).
    Stops when the mean log-likelihood changes less than tol (scikit-learn's rule)."""
    n, d = x.shape
    dev = x.device
    gen = torch.Generator().manual_seed(seed)
    shift = ((x.new_ones(n) @ x) / n).double()                        # (D,) the data mean
    xc = x.float() - shift.float()                                    # (n, D)
    z = torch.cat([xc, xc * xc], 1)                                   # (n, 2D) = [f, f^2]
    t0 = time.perf_counter()
    if init is None:
        labels = kmeans_labels(xc, k, gen)
        del xc
        nk = torch.bincount(labels, minlength=k).double()
        s = torch.zeros(k, 2 * d, dtype=torch.float64, device=dev)
        for i in range(0, n, chunk):
            s += (F.one_hot(labels[i:i + chunk], k).float().T @ z[i:i + chunk]).double()
        weights, means, variances = _m_step(nk, s, n, d, reg_covar)
    else:
        del xc
        weights, means, variances = (torch.as_tensor(a, dtype=torch.float64, device=dev) for a in init)
        means = means - shift
    start = (weights.cpu(), (means + shift).cpu(), variances.cpu())
    t_init = time.perf_counter() - t0 if init is None else 0.0
    ll, converged, it = -math.inf, False, 0
    for it in range(1, max_iter + 1):
        new_ll, nk, s = _e_step(z, weights, means, variances, chunk)
        weights, means, variances = _m_step(nk, s, n, d, reg_covar)
        change, ll = new_ll - ll, new_ll
        if abs(change) < tol:
            converged = True
            break
    return GMM(weights.cpu(), (means + shift).cpu(), variances.cpu(), ll, it, converged, start, t_init)


def to_sklearn(weights, means, variances):
    """One class's mixture as a scikit-learn diagonal GaussianMixture (for comparisons:
    its score_samples is the reference for Eq. (4) in the tests and bench/gmm.py)."""
    from sklearn.mixture import GaussianMixture
    gm = GaussianMixture(len(weights), covariance_type="diag")
    gm.weights_, gm.means_, gm.covariances_ = weights, means, variances
    gm.precisions_cholesky_ = 1 / np.sqrt(variances)
    gm.precisions_ = 1 / variances
    return gm


def fit_class_gmms(samples, k, min_per_component=10, device="cpu", **em):
    """One mixture per class (Eq. (4)). samples: list of C tensors (n_c, D) or None.

    A class with n_c < k * min_per_component gets n_c // min_per_component components;
    with fewer than min_per_component features it gets none (log density -inf). Returns
    padded arrays weights (C, K), means (C, K, D), variances (C, K, D) (weight 0 = unused
    slot) and a per-class info list."""
    d = next(s.shape[1] for s in samples if s is not None and len(s))
    C = len(samples)
    weights = np.zeros((C, k))
    means = np.zeros((C, k, d))
    variances = np.ones((C, k, d))
    info = []
    for c, s in enumerate(samples):
        n = 0 if s is None else len(s)
        kc = min(k, n // min_per_component)
        rec = {"class": CLASSES[c] if C == NUM_CLASSES else c, "features": n, "components": kc}
        if kc == 0:
            rec["note"] = f"fewer than {min_per_component} features: no prototype (log density -inf)"
        else:
            if kc < k:
                rec["note"] = f"{n} features: {kc} components instead of {k}"
            t0 = time.time()
            g = fit_gmm(s.to(device).float(), kc, seed=c, **em)
            # a component that ended up holding less than one sample carries no estimate
            keep = g.weights * n >= 1.0
            w = torch.where(keep, g.weights, 0)
            weights[c, :kc] = (w / w.sum()).numpy()
            means[c, :kc] = g.means.numpy()
            variances[c, :kc] = g.variances.numpy()
            rec.update(components=int(keep.sum()), log_likelihood=round(g.log_likelihood, 4),
                       em_iterations=g.n_iter, converged=g.converged, seconds=round(time.time() - t0, 2))
        info.append(rec)
    return weights, means, variances, info


# ============================================================================
# Eq. (4): log p_c(f) of every class at once, and the centroid baseline
# ============================================================================
def logsumexp_(x, out):
    """out = log sum_k exp(x[..., k]), overwriting x; every row needs one finite entry.
    Like torch.logsumexp, but exp's argument is clamped at -80: on the CPU torch.logsumexp
    is ~4x slower when most terms underflow, as they do here (log densities spread over
    hundreds of nats), and terms below e^-80 of the largest cannot change a float32 sum."""
    mx = x.amax(-1, keepdim=True)                                     # (..., 1)
    s = x.sub_(mx).clamp_min_(-80.0).exp_().sum(-1)                   # (...,)
    return torch.add(s.log_(), mx[..., 0], out=out)


class MixtureLogDensity:
    """scores(f) = [log p_c(f)]_c for all C classes (Eq. (4)), f (n, D) -> (n, C).

    All components of all classes are stacked into one (2D, C*K) matrix, so each chunk of
    features costs one matrix product [f, f^2] @ W plus a per-class logsumexp over K; no
    (n, K, D) tensor is formed. Features are shifted by the mean of the component means
    first (the density is shift invariant), which keeps the expanded form accurate in
    float32. A class without components (weights all 0) scores -inf."""

    def __init__(self, weights, means, variances, device="cpu", chunk=8192):
        w = torch.as_tensor(weights, dtype=torch.float64)             # (C, K)
        mu = torch.as_tensor(means, dtype=torch.float64)              # (C, K, D)
        var = torch.as_tensor(variances, dtype=torch.float64)         # (C, K, D)
        self.C, K, self.D = mu.shape
        used = w > 0                                                  # (C, K)
        self.present = torch.nonzero(used.any(1))[:, 0].to(device)    # classes with a mixture
        self.shift = mu[used].mean(0) if used.any() else torch.zeros(self.D, dtype=torch.float64)
        keep = used.any(1)
        w, mu, var, used = w[keep], mu[keep], var[keep], used[keep]
        mu = torch.where(used[..., None], mu - self.shift, 0.0)
        var = torch.where(used[..., None], var, 1.0)
        W, b = gaussian_terms(w.reshape(-1), mu.reshape(-1, self.D), var.reshape(-1, self.D))
        self.W = W.float().contiguous().to(device)                    # (2D, C'*K)
        self.b = b.float().to(device)                                 # (C'*K,), -inf: unused slot
        self.shift = self.shift.float().to(device)                    # (D,)
        self.K, self.chunk = K, chunk

    @torch.no_grad()
    def __call__(self, f):
        n, D = f.shape
        Cp = len(self.present)
        out = torch.full((n, self.C), -math.inf, device=f.device)
        dense = out if Cp == self.C else torch.empty(min(n, self.chunk), Cp, device=f.device)
        z = torch.empty(min(n, self.chunk), 2 * D, device=f.device)
        for i in range(0, n, self.chunk):
            m = min(self.chunk, n - i)
            zc = z[:m]
            torch.sub(f[i:i + m], self.shift, out=zc[:, :D])          # f - shift
            torch.mul(zc[:, :D], zc[:, :D], out=zc[:, D:])            # (f - shift)^2
            lp = torch.addmm(self.b, zc, self.W).view(m, Cp, self.K)  # (m, C, K)  Eq. (5), all at once
            if Cp == self.C:
                logsumexp_(lp, out[i:i + m])                          # (m, C)  Eq. (4)
            else:
                out[i:i + m, self.present] = logsumexp_(lp, dense[:m])
        return out


class CentroidScore:
    """CAs-PLA baseline (single isotropic prototype per class, Zhang et al. 2019, paper
    Table 3): scores(f) = -||f - mu_c|| for every class, -inf for a class without a mean."""

    def __init__(self, means, present, device="cpu", chunk=8192):
        mu = torch.as_tensor(means, dtype=torch.float64)              # (C, D)
        present = torch.as_tensor(present, dtype=torch.bool)
        self.shift = mu[present].mean(0)
        mu = torch.where(present[:, None], mu - self.shift, 0.0)
        self.Wt = mu.T.float().contiguous().to(device)                # (D, C)
        self.b = torch.where(present, (mu * mu).sum(1), math.inf).float().to(device)  # (C,)
        self.shift = self.shift.float().to(device)
        self.chunk = chunk

    @torch.no_grad()
    def __call__(self, f):
        out = torch.empty(f.shape[0], self.Wt.shape[1], dtype=torch.float32, device=f.device)
        for i in range(0, f.shape[0], self.chunk):
            fc = f[i:i + self.chunk].float() - self.shift             # (m, D)
            d2 = (fc * fc).sum(1, keepdim=True) - 2 * fc @ self.Wt + self.b   # (m, C)
            out[i:i + len(fc)] = -d2.clamp_min(0).sqrt()
        return out


# ============================================================================
# Eq. (6): pseudo label assignment, and thresholds from a target pseudo-label ratio
# ============================================================================
def threshold_labels(best, arg, delta):
    """Keep arg where best >= delta (delta a scalar, or per class (C,) indexed by arg);
    a pixel whose best score is -inf (no class has a prototype) or NaN is never kept."""
    thr = delta[arg] if torch.is_tensor(delta) and delta.ndim else delta
    keep = (best >= thr) & (best > -math.inf)
    return torch.where(keep, arg, IGNORE).to(torch.uint8)


def assign_pseudo_labels(scores, delta):
    """Eq. (6): y_i = argmax_c p_c(f_i) if max_c p_c(f_i) >= delta, else 255 (ignore).
    scores (n, C); ties go to the lowest class id."""
    best, arg = scores.max(1)
    return threshold_labels(best, arg, delta)                         # Eq. (6)


def delta_for_ratio(best, ratio):
    """The threshold that labels a fraction `ratio` of pixels: the k-th largest of `best`
    (k = round(ratio * n)), so that #{best >= delta} / n = ratio up to ties."""
    best = np.asarray(best, dtype=np.float64).ravel()
    n = best.size
    k = min(n, int(round(ratio * n)))
    if n == 0 or k <= 0:
        return math.inf
    return float(np.partition(best, n - k)[n - k])


def per_class_thresholds(best, arg, ratio, num_classes=NUM_CLASSES):
    """IAS-like selection (Table 3): per predicted class c, the threshold keeping the same
    fraction `ratio` of the pixels predicted c (the global one for unseen classes)."""
    best, arg = np.asarray(best).ravel(), np.asarray(arg).ravel()
    glob = delta_for_ratio(best, ratio)
    return np.array([delta_for_ratio(best[arg == c], ratio) if (arg == c).any() else glob
                     for c in range(num_classes)])


# ============================================================================
# Target images: features upsampled to the image size (footnote 1), scored in bands
# ============================================================================
def bilinear_index(n_in, n_out, device):
    """Source indices and weights of bilinear resizing n_in -> n_out, exactly as
    F.interpolate(mode='bilinear', align_corners=False)."""
    src = ((torch.arange(n_out, device=device, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    return i0, i1, (src - i0).clamp_max(1.0)


def upsample_rows(feat_hwd, idx_y, idx_x, r0, r1):
    """Output rows r0:r1 of the bilinearly upsampled feature map, as (rows * W, D).
    feat_hwd: (h, w, D) channels-last features; idx_y / idx_x from bilinear_index."""
    y0, y1, ly = (t[r0:r1] for t in idx_y)
    x0, x1, lx = idx_x
    rows = feat_hwd[y0] * (1 - ly)[:, None, None] + feat_hwd[y1] * ly[:, None, None]   # (b, w, D)
    out = rows[:, x0] * (1 - lx)[None, :, None] + rows[:, x1] * lx[None, :, None]     # (b, W, D)
    return out.reshape(-1, feat_hwd.shape[-1])


@torch.no_grad()
def score_image(model, img, pla, scorer, amp, chunk=1 << 16):
    """(best, arg): per pixel of the image, the best class score and its class (H, W).
    maps: log p_c(f) (Eq. (4)); centroid: -||f - mu_c||; confidence: softmax probability.
    img: (1, 3, H, W) uint8 on the model's device."""
    H, W = img.shape[-2:]
    with autocast(img.device, amp):
        feat, logits = model(normalize(img))                          # (1, D, h, w), (1, C, h, w)
    if pla == "confidence":
        prob = F.interpolate(logits.float(), size=(H, W), mode="bilinear", align_corners=False).softmax(1)
        best, arg = prob[0].max(0)
        return best, arg
    f = feat[0].float().permute(1, 2, 0).contiguous()                 # (h, w, D)
    iy, ix = bilinear_index(f.shape[0], H, img.device), bilinear_index(f.shape[1], W, img.device)
    best = torch.empty(H, W, device=img.device)
    arg = torch.empty(H, W, dtype=torch.long, device=img.device)
    band = max(1, chunk // W)
    for r0 in range(0, H, band):
        r1 = min(H, r0 + band)
        s = scorer(upsample_rows(f, iy, ix, r0, r1))                  # (rows * W, C)
        b, a = s.max(1)
        best[r0:r1], arg[r0:r1] = b.view(r1 - r0, W), a.view(r1 - r0, W)
    return best, arg


def all_gather(obj):
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def calibrate(model, items, pla, scorer, ratio, args, device, rank, world):
    """--target-ratio: threshold(s) chosen on a random subset of target images and pixels."""
    rng = np.random.default_rng(args.seed)
    pick = sorted(rng.permutation(len(items))[:args.calib_images].tolist())
    mine = [items[i] for i in pick][rank::world]
    bests, args_ = [], []
    prng = np.random.default_rng([args.seed, rank, 1])
    for batch in tqdm(image_loader([p for p, _ in mine], args.workers), desc="calibrate threshold",
                      disable=rank != 0):
        best, arg = score_image(model, batch["image"][None].to(device), pla, scorer, args.amp, args.chunk)
        best, arg = best.flatten().cpu().numpy(), arg.flatten().cpu().numpy()
        sel = prng.choice(best.size, size=min(best.size, args.calib_pixels), replace=False)
        bests.append(best[sel])
        args_.append(arg[sel])
    gathered = all_gather((np.concatenate(bests) if bests else np.zeros(0),
                           np.concatenate(args_) if args_ else np.zeros(0, np.int64)))
    best = np.concatenate([g[0] for g in gathered])
    arg = np.concatenate([g[1] for g in gathered])
    if pla == "confidence":
        thr = per_class_thresholds(best, arg, ratio)
    else:
        thr = np.full(NUM_CLASSES, delta_for_ratio(best, ratio))
    return {"thresholds": thr.tolist(), "images": len(pick), "pixels": int(best.size),
            "ratio_on_sample": float(np.mean(best >= thr[arg])) if best.size else None}


# ============================================================================
# Command line
# ============================================================================
def parse_args(argv=None):
    p = base_parser(__doc__)
    g = p.add_argument_group("pseudo-label assignment (Sec. 3.3, Sec. 4.2, Table 3)")
    g.add_argument("--pla", default="maps", choices=["maps", "centroid", "confidence"],
                   help="maps: MAPs-PLA (Eq. (4)-(6)); centroid: CAs-PLA, one isotropic prototype "
                        "(class mean, Euclidean distance); confidence: IAS-like per-class "
                        "softmax-confidence thresholds (needs --target-ratio)")
    g.add_argument("--delta", type=float, default=None,
                   help="delta of Eq. (6), a log-density threshold (paper Sec. 4.2: 100 for GTA5, "
                        "-50 for SYNTHIA, the default by --source); it depends on the feature "
                        "scale, so for another backbone or the toy data use --target-ratio")
    g.add_argument("--distance-threshold", type=float, default=None,
                   help="--pla centroid: label a pixel when its nearest class mean is closer than this")
    g.add_argument("--target-ratio", type=float, default=None,
                   help="choose the threshold so that this fraction of target pixels get a pseudo "
                        "label (paper Table 5 'PL ratio'); the chosen value goes to the manifest")
    g.add_argument("--bn-images", type=int, default=0,
                   help="0 (the official code): E normalises source and target features with the "
                        "warm-up's running batch-norm statistics. N > 0: E's statistics are "
                        "re-estimated on N whole stylized source images for Eq. (3) and on N whole "
                        "target training images for Eq. (6) (README, 'what the paper leaves unsaid')")
    g = p.add_argument_group("MAPs (Eq. (3)-(5), Sec. 4.2)")
    g.add_argument("--components", type=int, default=8, help="K, Gaussians per class (paper: 8)")
    g.add_argument("--samples-per-class", type=int, default=300000,
                   help="features sampled per class for EM (paper: 300,000)")
    g.add_argument("--min-per-component", type=int, default=10,
                   help="a class with fewer than K times this many features gets fewer components; "
                        "below this many, no prototype")
    g.add_argument("--reg-covar", type=float, default=1e-6, help="variance floor added to every "
                   "diagonal covariance (scikit-learn's default)")
    g.add_argument("--tol", type=float, default=1e-3, help="EM stops when the mean log-likelihood "
                   "changes by less (scikit-learn's default)")
    g.add_argument("--max-iter", type=int, default=100, help="EM iteration cap (scikit-learn's default)")
    g = p.add_argument_group("running")
    g.add_argument("--calib-images", type=int, default=100, help="--target-ratio: target images sampled")
    g.add_argument("--calib-pixels", type=int, default=20000, help="--target-ratio: pixels sampled per image")
    g.add_argument("--chunk", type=int, default=1 << 16, help="pixels upsampled and scored per band "
                   "(and per matrix product on CUDA)")
    g.add_argument("--previews", type=int, default=4, help="colourised previews written")
    g.add_argument("--amp", default=True, action=argparse.BooleanOptionalAction,
                   help="mixed precision for the segmentor on CUDA (scores are float32)")
    args = p.parse_args(argv)
    given = [n for n in ("delta", "distance_threshold", "target_ratio") if getattr(args, n) is not None]
    if len(given) > 1:
        p.error(f"give one of --delta, --distance-threshold, --target-ratio (got {given})")
    if args.pla == "maps" and args.distance_threshold is not None:
        p.error("--distance-threshold is for --pla centroid; MAPs uses --delta or --target-ratio")
    if args.pla == "centroid" and not (args.distance_threshold is not None or args.target_ratio is not None):
        p.error("--pla centroid needs --distance-threshold or --target-ratio")
    if args.pla == "centroid" and args.delta is not None:
        p.error("--delta is the MAPs log-density threshold; --pla centroid uses --distance-threshold")
    if args.pla == "confidence" and args.target_ratio is None:
        p.error("--pla confidence needs --target-ratio (the fraction kept of each predicted class)")
    if args.target_ratio is not None and not 0 < args.target_ratio <= 1:
        p.error(f"--target-ratio must be in (0, 1], got {args.target_ratio}")
    return args


def domain_statistics(model, src_items, image_for, targets, n, device):
    """--bn-images n: a copy of E for each domain, its batch-norm statistics re-estimated on n
    whole, unaugmented images of that domain (common.recompute_bn_statistics; no weight
    changes): the stylized source for Eq. (3), the target training images for Eq. (6).
    Why: the warm-up's running statistics average its augmented training crops of the
    source, so target features are normalised with source statistics; per-domain statistics
    (AdaBN, Li et al., 2016) put both domains' features where the prototypes expect them.
    The official code (generate_maps_pseudolabel.py) runs the warm-up in eval mode, as
    --bn-images 0 does. Returns (source copy or None without src_items, target copy)."""
    def recalibrated(items):
        m = copy.deepcopy(model)
        recompute_bn_statistics(m, bn_images(items, n), device)
        return m.eval()
    src = None if src_items is None else recalibrated([(image_for(p), y) for p, y in src_items])
    return src, recalibrated(targets)


# ============================================================================
# The stage
# ============================================================================
def main(argv=None):
    args = parse_args(argv)
    rank, world = setup_distributed(args.device)
    seed_everything(args.seed)
    device = pick_device(args.device)
    stage = Stage(args, "03_maps")
    stage.use("02_warmup")
    ckpt_path = need(stage_dir(args.work, "02_warmup") / "model.pt", "02_warmup")
    model, ckpt = model_from_checkpoint(ckpt_path, device, producer="02_warmup")
    if ckpt["args"].get("source", args.source) != args.source:
        raise StageError(f"{ckpt_path} was trained on {ckpt['args']['source']} but --source is "
                         f"{args.source}: run 03_maps.py --source {ckpt['args']['source']}")
    for p in model.parameters():
        p.requires_grad_(False)
    src_items = image_for = None
    if args.pla != "confidence":
        src_items, image_for = stylized_source(args, stage)
    targets = target_train_items(args.data)
    gt_for = target_ground_truth(args.data)
    src_model = tgt_model = model
    if args.bn_images:
        src_model, tgt_model = domain_statistics(model, src_items, image_for, targets,
                                                 args.bn_images, device)
        log0(f"batch-norm statistics re-estimated per domain on {args.bn_images} source and "
             f"target images (--bn-images)")
    resuming = stage.begin()
    stage.add_input(ckpt_path)
    out = stage.dir
    log0(f"03_maps: --pla {args.pla}, {len(targets)} target images, device {device}, "
         f"{'resuming' if resuming else 'fresh run'}")

    # ============ Eq. (3)-(5): source prototypes ============
    info, scorer = None, None
    proto_file = out / ("gmm.npz" if args.pla == "maps" else "centroids.npz")
    if args.pla != "confidence":
        if not (resuming and proto_file.exists()):
            res, sums, counts = collect_source_features(
                src_model, src_items, image_for, label_kind(args.source), args.samples_per_class, device,
                args.amp, args.workers, args.seed, rank, world)
            samples, counts, sums = merge_across_ranks(res, sums, counts, out, args, rank, world)
            if rank == 0:
                save_prototypes(proto_file, samples, counts, sums, args, device)
            barrier()
        z = np.load(proto_file)
        info = json.loads(str(z["info"]))
        # rows per matrix product: 8192 keeps a chunk's operands in a CPU's caches (measured
        # fastest in bench/gmm.py); a GPU wants large products
        rows = args.chunk if device.type == "cuda" else 8192
        if args.pla == "maps":
            scorer = MixtureLogDensity(z["weights"], z["means"], z["variances"], device, rows)
        else:
            scorer = CentroidScore(z["class_means"], z["source_seen"] > 0, device, rows)
        absent = [r["class"] for r in info if r["components"] == 0]
        if absent:
            log0(f"no prototype (never predicted correctly on the source): {', '.join(absent)}")
        if len(absent) == len(info):
            raise DataError(f"{proto_file}: no class has a prototype: is {ckpt_path} trained?")

    # ============ thresholds: delta of Eq. (6), or by --target-ratio ============
    calib = None
    if args.target_ratio is not None:
        cfile = out / "calibration.json"
        if resuming and cfile.exists():
            calib = json.loads(cfile.read_text())
        else:
            calib = calibrate(tgt_model, targets, args.pla, scorer, args.target_ratio, args, device, rank, world)
            if rank == 0:
                save_json(cfile, calib)
        thr = np.array(calib["thresholds"], dtype=np.float64)
    elif args.pla == "maps":
        thr = np.full(NUM_CLASSES, args.delta if args.delta is not None else DEFAULT_DELTA[args.source])
    else:
        thr = np.full(NUM_CLASSES, -args.distance_threshold)
    thr_t = torch.tensor(thr, dtype=torch.float32, device=device)
    log0("threshold: " + describe_threshold(args.pla, thr))

    # ============ Eq. (6): pseudo labels for every target training image ============
    (out / "labels").mkdir(exist_ok=True)
    tally = LabelTally()                           # report counters (ground truth where present)
    mine = list(range(rank, len(targets), world))
    todo = [i for i in mine if not (out / "labels" / item_name(targets[i][0])).exists()]
    done = sorted(set(mine) - set(todo))
    for i in done:                                 # resumed: count what is already written
        pl = decode_label(out / "labels" / item_name(targets[i][0]), "trainid")
        tally.add(pl, gt_for.get(item_name(targets[i][0])))
    bar = tqdm(zip(todo, image_loader([targets[i][0] for i in todo], args.workers)), total=len(todo),
               desc=f"pseudo labels ({args.pla})", disable=rank != 0)
    for i, batch in bar:
        name = item_name(targets[i][0])
        img = batch["image"][None].to(device)                         # (1, 3, H, W)
        best, arg = score_image(tgt_model, img, args.pla, scorer, args.amp, args.chunk)
        pl = threshold_labels(best, arg, thr_t).cpu().numpy()         # Eq. (6)
        save_png(out / "labels" / name, pl, palette=True)
        gt = tally.add(pl, gt_for.get(name))
        if i < args.previews:
            im = batch["image"].permute(1, 2, 0).numpy()
            panels = [overlay(im, pl), colorize(pl)] + ([colorize(gt)] if gt is not None else [])
            save_png(out / "previews" / name, np.concatenate(panels, 1))

    # ============ report: pseudo-label ratio, accuracy, per-class IoU (Table 5 view) ============
    tally.all_reduce(device)
    summary = {"pla": args.pla, "bn_images": args.bn_images,
               "threshold": describe_threshold(args.pla, thr, as_dict=True),
               **tally.summary(args.source), "images": len(targets)}
    if calib:
        summary["calibration"] = {k: calib[k] for k in ("images", "pixels", "ratio_on_sample")}
    if rank == 0:
        report = {**summary, **tally.report(args.source)}
        if info:
            report["prototypes"] = info
        tally.log(args.source, "the pseudo labels")
        save_json(out / "report.json", report)
        stage.finish(summary, target_items_digest=items_digest(targets), classes=list(CLASSES),
                     outputs={"labels": "labels", "prototypes": proto_file.name if info else None,
                              "report": "report.json"})
        log0(f"PL ratio {summary['pl_ratio']:.3f}" + (f", accuracy {summary['accuracy']:.3f}, "
             f"mIoU {summary['miou']:.1f} (labelled pixels only: {summary['miou_labelled']:.1f})"
             if "accuracy" in summary else "") + f" -> {out}")
    barrier()
    if world > 1:
        cleanup_distributed()
    return summary


def describe_threshold(pla, thr, as_dict=False):
    if pla == "maps":
        d = {"delta": float(thr[0])}
    elif pla == "centroid":
        d = {"distance": float(-thr[0])}
    else:
        d = {"confidence_per_class": {CLASSES[c]: round(float(t), 5) for c, t in enumerate(thr)}}
    return d if as_dict else json.dumps(d)


def merge_across_ranks(res, sums, counts, out, args, rank, world):
    """Per-class samples (list of C tensors), correct-pixel counts (C,) and feature sums
    (C, D) over all ranks; under torchrun they travel through shard files to rank 0
    (None elsewhere), whose merged reservoirs stay uniform samples (merge_reservoirs)."""
    if world == 1:
        return [r.sample() for r in res], counts, sums
    shard = out / "shards" / f"rank{rank}.npz"
    save_npz(shard, seen=np.array([r.seen for r in res]), sums=sums.numpy(), counts=counts.numpy(),
             **{f"f{c}": r.sample().numpy() for c, r in enumerate(res)})
    barrier()
    if rank != 0:
        return None, None, None
    parts = [np.load(out / "shards" / f"rank{r}.npz") for r in range(world)]
    rng = np.random.default_rng([args.seed, world])
    samples = [merge_reservoirs([(torch.from_numpy(p[f"f{c}"]), int(p["seen"][c])) for p in parts],
                                args.samples_per_class, rng)[0] for c in range(NUM_CLASSES)]
    sums = torch.from_numpy(sum(p["sums"] for p in parts))
    counts = torch.from_numpy(sum(p["counts"] for p in parts))
    shutil.rmtree(out / "shards")
    return samples, counts, sums


def save_prototypes(path, samples, counts, sums, args, device):
    """Save the class prototypes: the mixtures of Eq. (4) (gmm.npz) or the class means
    (centroids.npz), with the class means over every correct source pixel in both."""
    counts = counts.numpy()
    sampled = np.array([0 if s is None else len(s) for s in samples])
    if not sampled.any():
        raise DataError("no source pixel is classified correctly by the warm-up model (Eq. (3) is "
                        "empty for every class): is work/02_warmup/model.pt trained?")
    class_means = sums.numpy() / np.maximum(counts, 1)[:, None]      # (C, D)
    common = dict(source_seen=counts, source_sampled=sampled, class_means=class_means)
    if path.name == "centroids.npz":
        info = [{"class": CLASSES[c], "features": int(sampled[c]), "components": int(counts[c] > 0),
                 "source_pixels": int(counts[c])} for c in range(NUM_CLASSES)]
        save_npz(path, present=np.nonzero(counts > 0)[0], info=json.dumps(info), **common)
        return
    t0 = time.time()
    w, mu, var, info = fit_class_gmms(samples, args.components, args.min_per_component, device,
                                      tol=args.tol, max_iter=args.max_iter, reg_covar=args.reg_covar)
    for c, r in enumerate(info):
        r["source_pixels"] = int(counts[c])
    log0(f"fitted {sum(r['components'] > 0 for r in info)} class mixtures in {time.time() - t0:.1f}s (Eq. 4-5)")
    save_npz(path, weights=w, means=mu, variances=var, present=np.nonzero((w > 0).any(1))[0],
             n_components=(w > 0).sum(1), info=json.dumps(info), **common)


if __name__ == "__main__":
    run_main(main)

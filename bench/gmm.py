"""Benchmark of the MAPs mixtures in 03_maps.py (Eq. (4)-(5)): fit and scoring, one run, same data.

fit:   300,000 x 256 features drawn from a known 8-component diagonal mixture. Our EM
       (03_maps.fit_gmm: k-means++ + Lloyd init, then EM) against scikit-learn's
       GaussianMixture(8, 'diag') with its own k-means init, and scikit-learn started from
       our initialisation. Wall time and the final mean log-likelihood, both evaluated by
       scikit-learn's score() on the same data.
score: 2,000,000 x 256 features against 19 class mixtures of K = 8 (all C*K components):
       ours (03_maps.MixtureLogDensity: one [f, f^2] @ W product per chunk over the stacked
       components, then a per-class logsumexp) against 19 scikit-learn score_samples calls
       and against a broadcast (N, K, D) implementation (the official code's way), as rows/s;
       and the GFLOP/s of our scoring (counting the matrix product's 2 * N * 2D * C*K flops)
       next to a plain torch.mm of the same shape (N, 2D) x (2D, C*K), the practical ceiling.
       The slow baselines run on the first rows only (--sk-rows, --bc-rows); throughput is per row.

    python bench/gmm.py                    # full size
    python bench/gmm.py --scale 0.25       # a quarter of every row count (a small machine)
    python bench/gmm.py --device cuda      # ours and torch.mm on the GPU (baselines stay on CPU)
"""
import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("maps", ROOT / "03_maps.py")
maps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(maps)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu", repeat=1):
    """(best wall time over `repeat` runs, last result)."""
    best, out = math.inf, None
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def draw_mixture(rng, n, K, D, spread=0.5):
    """n rows from a random K-component diagonal mixture (float32) and its parameters."""
    w = rng.dirichlet(np.full(K, 5.0))
    mu = rng.normal(0, spread, size=(K, D)) + rng.uniform(0, 1, size=D)
    var = rng.uniform(0.1, 1.0, size=(K, D))
    z = rng.choice(K, size=n, p=w)
    x = np.empty((n, D), np.float32)
    for k in range(K):
        idx = np.nonzero(z == k)[0]
        x[idx] = mu[k] + rng.standard_normal((len(idx), D), dtype=np.float32) * np.sqrt(var[k]).astype(np.float32)
    return x, (w, mu, var)


def broadcast_log_density(x, w, mu, var, chunk=4096):
    """The official code's way: per class, (n, K, D) differences, then a logsumexp over K."""
    C, K, D = mu.shape
    mu, var = torch.as_tensor(mu, dtype=torch.float32), torch.as_tensor(var, dtype=torch.float32)
    logw = torch.log(torch.as_tensor(w, dtype=torch.float32))
    const = -0.5 * (D * math.log(2 * math.pi) + torch.log(var).sum(-1))   # (C, K)
    out = torch.empty(len(x), C)
    for i in range(0, len(x), chunk):
        xc = x[i:i + chunk]
        for c in range(C):
            diff = xc[:, None, :] - mu[c][None]                               # (m, K, D)
            lp = -0.5 * (diff * diff / var[c][None]).sum(-1) + const[c] + logw[c]   # (m, K)
            out[i:i + chunk, c] = torch.logsumexp(lp, 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every row count")
    p.add_argument("--fit-rows", type=int, default=300000)
    p.add_argument("--score-rows", type=int, default=2000000)
    p.add_argument("--sk-rows", type=int, default=200000, help="rows for the 19 scikit-learn calls")
    p.add_argument("--bc-rows", type=int, default=20000, help="rows for the broadcast implementation")
    p.add_argument("--mm-rows", type=int, default=500000, help="rows of the single torch.mm ceiling")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-fit", action="store_true")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (best kept)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rows = {k: max(1000, int(getattr(a, k) * a.scale)) for k in ("fit_rows", "score_rows", "sk_rows", "bc_rows", "mm_rows")}
    D, C, K, dev = a.dim, a.classes, a.components, a.device
    rng = np.random.default_rng(a.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}"
          + (f" ({torch.cuda.get_device_name()})" if dev.startswith("cuda") else "")
          + f"; scale {a.scale}", flush=True)

    # ============ fit: 300,000 x 256, K = 8 ============
    if not a.skip_fit:
        n = rows["fit_rows"]
        x, _ = draw_mixture(rng, n, K, D)
        xt = torch.from_numpy(x).to(dev)
        t_ours, g = timed(lambda: maps.fit_gmm(xt, K, seed=a.seed), dev)
        ll_ours = maps.to_sklearn(*(t.numpy() for t in (g.weights, g.means, g.variances))).score(x)
        sk = GaussianMixture(K, covariance_type="diag", random_state=a.seed, tol=1e-3, max_iter=100,
                             reg_covar=1e-6)
        t_sk, _ = timed(lambda: sk.fit(x))
        w0, mu0, var0 = (t.numpy() for t in g.init)
        sk2 = GaussianMixture(K, covariance_type="diag", weights_init=w0, means_init=mu0,
                              precisions_init=1 / var0, tol=1e-3, max_iter=100, reg_covar=1e-6)
        t_sk2, _ = timed(lambda: sk2.fit(x))
        t_em = t_ours - g.init_seconds
        ll_sk, ll_sk2 = sk.score(x), sk2.score(x)
        print(f"\nfit {n} x {D}, K={K} (diag); LL = mean log-likelihood per sample, all by sklearn score():")
        print(f"  ours                   {t_ours:7.2f} s (k-means++/Lloyd init {g.init_seconds:.2f} s, "
              f"EM {t_em:.2f} s, {g.n_iter} it)  LL {ll_ours:.4f}")
        print(f"  sklearn, its own init  {t_sk:7.2f} s ({sk.n_iter_} EM it)  LL {ll_sk:.4f}"
              f"   -> ours {t_sk / t_ours:.1f}x faster, LL ours - sklearn {ll_ours - ll_sk:+.4f}")
        print(f"  sklearn, our init      {t_sk2:7.2f} s ({sk2.n_iter_} EM it)  LL {ll_sk2:.4f}"
              f"   -> our EM {t_sk2 / t_em:.1f}x faster, LL ours - sklearn {ll_ours - ll_sk2:+.4f}", flush=True)
        del x, xt

    # ============ scoring: 2,000,000 x 256 against 19 mixtures of K = 8 ============
    n, ns, nb = rows["score_rows"], rows["sk_rows"], rows["bc_rows"]
    w = rng.dirichlet(np.ones(K), size=C)
    mu = rng.normal(0, 0.5, size=(C, K, D)) + 0.5
    var = rng.uniform(0.1, 1.0, size=(C, K, D))
    x = (rng.standard_normal((n, D), dtype=np.float32) * 0.8 + 0.5).astype(np.float32)
    xt = torch.from_numpy(x).to(dev)
    scorer = maps.MixtureLogDensity(w, mu, var, dev)
    mixtures = [maps.to_sklearn(w[c], mu[c], var[c]) for c in range(C)]
    xb = torch.from_numpy(x[:nb])
    nm = min(n, rows["mm_rows"])
    A = torch.randn(nm, 2 * D, device=dev)
    B = torch.randn(2 * D, C * K, device=dev)
    Ac = A[:scorer.chunk].contiguous()
    out = torch.empty(scorer.chunk, C * K, device=dev)

    def mm_chunks():
        for _ in range(0, nm, scorer.chunk):
            torch.mm(Ac, B, out=out)
    runs = {"ours": lambda: scorer(xt),
            "sklearn": lambda: np.stack([m.score_samples(x[:ns]) for m in mixtures], 1),
            "broadcast": lambda: broadcast_log_density(xb, w, mu, var),
            "mm": lambda: torch.mm(A, B), "mm_chunks": mm_chunks}
    # a shared machine: rounds interleave the methods, each keeps its best round
    best, res = {k: math.inf for k in runs}, {}
    scorer(xt[:50000]), torch.mm(A, B)
    for _ in range(a.rounds):
        for k, fn in runs.items():
            t, res[k] = timed(fn, dev if k in ("ours", "mm", "mm_chunks") else "cpu")
            best[k] = min(best[k], t)
    s_ours = res["ours"].cpu().numpy()
    err_sk = np.max(np.abs(s_ours[:ns] - res["sklearn"]) / np.abs(res["sklearn"]))
    err_bc = np.max(np.abs(s_ours[:nb] - res["broadcast"].numpy()) / np.abs(res["broadcast"].numpy()))

    def gf(rows_, t):
        return 2.0 * rows_ * 2 * D * C * K / t / 1e9                 # flops of the (rows, 2D) x (2D, CK) product
    r_ours, r_sk, r_bc = n / best["ours"], ns / best["sklearn"], nb / best["broadcast"]
    g_ours, g_mm, g_mmc = gf(n, best["ours"]), gf(nm, best["mm"]), gf(nm, best["mm_chunks"])
    print(f"\nscore {n} x {D} against C={C} mixtures x K={K}: all classes' log p_c(f), Eq. (4); "
          f"best of {a.rounds} interleaved rounds")
    print(f"  ours (stacked matmul)  {r_ours / 1e6:8.3f} M rows/s  ({best['ours']:.2f} s, {g_ours:.1f} GFLOP/s)")
    print(f"  sklearn, {C} calls      {r_sk / 1e6:8.3f} M rows/s  (on {ns} rows, {best['sklearn']:.2f} s)"
          f"   -> ours {r_ours / r_sk:.1f}x   max rel diff {err_sk:.1e}")
    print(f"  broadcast (N, K, D)    {r_bc / 1e6:8.3f} M rows/s  (on {nb} rows, {best['broadcast']:.2f} s)"
          f"   -> ours {r_ours / r_bc:.1f}x   max rel diff {err_bc:.1e}")
    print(f"  torch.mm ({nm} x {2 * D}) x ({2 * D} x {C * K}): {g_mm:.1f} GFLOP/s in one call, "
          f"{g_mmc:.1f} GFLOP/s in chunks of {scorer.chunk} rows")
    print(f"  ours reaches {g_ours / max(g_mm, g_mmc):.2f} of the torch.mm ceiling", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()

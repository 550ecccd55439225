"""Throughput of the deployed graph: onnxruntime vs PyTorch eager on the same model and input.

Both engines run the exact graph export_onnx.py deploys (uint8 NHWC in; normalisation,
DeepLabV3+, bilinear resize, softmax and argmax inside) on the same image, batch 1.
Weights are random (timing does not depend on their values). Each engine gets
--warmup untimed runs, then --repeats timed runs interleaved torch / onnxruntime (so a
busy shared machine slows both alike); the table shows medians and the speed-up
(torch time / onnxruntime time = onnxruntime throughput / torch throughput).

onnxruntime session: graph optimisation ORT_ENABLE_ALL, intra-op threads = cores
(torch gets the same thread count). BatchNorm: the TorchScript exporter folds it into
the convolutions in eval mode, so the ONNX graph has no BatchNormalization nodes;
PyTorch eager runs Conv + BatchNorm as trained. --ort-default also times a session
with onnxruntime's default options. When CUDA really works (torch and/or onnxruntime),
the CUDA engines are timed too. The max|dp| column is a sanity check of the outputs;
random resnet101 weights give logits of ~1e3 (untrained BatchNorm statistics), so
float32 rounding shows up as ~1e-3 at near-tie pixels there (a random resnet18: ~1e-8).
The torch CUDA engine runs in float32 like the others (cuDNN's TF32 off, as
export_onnx.py's validation does); --tf32 times it with TF32 convolutions and matmuls,
which are faster on Ampere and later GPUs and move max|dp| far above float32 rounding.

    python bench/onnx_speed.py                          # resnet101, 1024x512 and 1914x1052
    python bench/onnx_speed.py --backbone resnet18 --repeats 2
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import export_onnx  # noqa: E402


def timed(fn, sync=None):
    t = time.perf_counter()
    out = fn()
    if sync:
        sync()
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet101", choices=common.BACKBONES, help="paper: resnet101")
    p.add_argument("--sizes", nargs="+", default=["1024x512", "1914x1052"], metavar="WxH")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per engine and size")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per engine and size (median shown)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both engines (default: all cores)")
    p.add_argument("--ort-default", action="store_true",
                   help="also time an onnxruntime session with default options")
    p.add_argument("--tf32", action="store_true",
                   help="let the torch CUDA engine use TF32 (default: float32, comparable outputs)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    threads = a.threads or export_onnx._cpu_count()
    torch.set_num_threads(threads)
    torch.manual_seed(a.seed)
    model = common.build_model(a.backbone).eval()
    wrapped = export_onnx.build_deployable(model)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.onnx"
        t0 = time.perf_counter()
        export_onnx.export_graph(model, path)
        print(f"exported {a.backbone} in {time.perf_counter() - t0:.1f} s "
              f"({path.stat().st_size / 2 ** 20:.0f} MB)")
        import onnxruntime as ort
        engines = {}

        def torch_engine(m, dev):
            sync = torch.cuda.synchronize if dev.type == "cuda" else None

            def run(x):
                with torch.inference_mode():
                    label, probs = m(torch.from_numpy(x).to(dev))
                    return label.cpu().numpy(), probs.cpu().numpy()
            return run, sync
        engines["torch eager cpu"] = torch_engine(wrapped, torch.device("cpu"))
        sess, _ = export_onnx.open_session(path, "cpu", threads)
        engines["onnxruntime cpu"] = (lambda x, s=sess: s.run(["label", "probs"], {"image": x}), None)
        if a.ort_default:
            s0 = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            engines["onnxruntime cpu (default options)"] = (
                lambda x, s=s0: s.run(["label", "probs"], {"image": x}), None)
        if torch.cuda.is_available():
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = a.tf32          # torch's default for cuDNN is True
            torch.backends.cuda.matmul.allow_tf32 = a.tf32
            gpu = export_onnx.build_deployable(common.build_model(a.backbone).eval())
            gpu.load_state_dict(wrapped.state_dict())
            engines["torch eager cuda"] = torch_engine(gpu.cuda(), torch.device("cuda"))
        scuda, note = export_onnx.open_session(path, "auto", threads)
        if scuda.get_providers()[0] == "CUDAExecutionProvider":
            engines["onnxruntime cuda"] = (lambda x, s=scuda: s.run(["label", "probs"], {"image": x}), None)

        print(f"backbone {a.backbone}, batch 1, {threads} threads, warm-up {a.warmup}, repeats {a.repeats} "
              f"(median); torch {torch.__version__}, onnxruntime {ort.__version__} "
              f"(ORT_ENABLE_ALL, intra-op threads {threads})" + (f"; {note}" if note else "")
              + (f"; torch CUDA {'TF32' if a.tf32 else 'float32'}" if "torch eager cuda" in engines else ""))
        rng = np.random.default_rng(a.seed)
        rows = []
        for size in a.sizes:
            w, h = (int(v) for v in size.split("x"))
            x = rng.integers(0, 256, (1, h, w, 3), dtype=np.uint8)   # (1, H, W, 3) uint8
            outs = {}
            for name, (run, sync) in engines.items():
                for _ in range(a.warmup):
                    outs[name] = run(x)
            times = {name: [] for name in engines}
            for _ in range(a.repeats):
                for name, (run, sync) in engines.items():
                    dt, outs[name] = timed(lambda: run(x), sync)
                    times[name].append(dt)
            med = {k: statistics.median(v) for k, v in times.items()}
            ref = outs["torch eager cpu"][1]
            diff = max(float(np.abs(o[1] - ref).max()) for o in outs.values())
            rows.append((size, med, diff))
        base = "torch eager cpu"
        names = list(engines)
        wid = {n: len(n) + 4 for n in names}
        print(f"{'size':>10} " + " ".join(f"{n + ' (s)':>{wid[n]}}" for n in names)
              + f" {'ort cpu / torch cpu':>20} {'max|dp|':>9}")
        for size, med, diff in rows:
            print(f"{size:>10} " + " ".join(f"{med[n]:{wid[n]}.3f}" for n in names)
                  + f" {med[base] / med['onnxruntime cpu']:19.2f}x {diff:9.1e}")
        pairs = [(n, "torch eager cuda" if "cuda" in n and "torch eager cuda" in engines else base)
                 for n in names if n.startswith("onnxruntime")]
        for size, med, _ in rows:
            print(f"{size}: " + ", ".join(f"{n} throughput = {med[b] / med[n]:.2f}x {b}" for n, b in pairs))
    return rows


if __name__ == "__main__":
    main()

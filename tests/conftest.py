"""Shared test fixtures: small toy datasets written by toy_data.py, and a loader for
the numbered stage scripts (their names start with digits, so `import` cannot)."""
import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def load_stage(name):
    """Import a stage script, e.g. load_stage('03_maps') -> module."""
    path = ROOT / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """A small toy dataset (half-size images, fewer of them), generated once per session."""
    import toy_data as td
    d = tmp_path_factory.mktemp("data")
    td.main(["--data", str(d), "--scale", "0.5", "--count", "0.5", "--seed", "0"])
    return d


def run_stage(name, *args):
    """Run a stage script's main() in-process with the given command-line arguments, on
    the CPU unless they name a --device: the suite checks exact CPU results (determinism,
    recomputed statistics), and a CUDA machine would otherwise be every stage's default
    (bench/cuda_check.sh runs the CUDA paths)."""
    args = [str(a) for a in args]
    return load_stage(name).main(args if "--device" in args else [*args, "--device", "cpu"])


TINY_TRAIN = ["--backbone", "resnet18", "--weights", "none", "--batch-size", "2",
              "--crop", "64", "32", "--workers", "0", "--log-every", "10", "--device", "cpu"]


@pytest.fixture(scope="session")
def warmup_work(toy_data, tmp_path_factory):
    """A work folder in which 01_stylize and 02_warmup are complete (tiny resnet18 run on
    the small toy data). Tests that write further stages copy it first (shutil.copytree)."""
    w = tmp_path_factory.mktemp("work")
    run_stage("01_stylize", "--data", toy_data, "--work", w, "--workers", "0")
    run_stage("02_warmup", "--data", toy_data, "--work", w, *TINY_TRAIN,
              "--iters", "30", "--eval-every", "30", "--source-eval", "8")
    return w


def few_targets(toy_data, dest, n=2):
    """A copy of the toy data with only the first n Cityscapes train and val images (and
    their labels): the stage's passes over the target set are then short."""
    import shutil
    shutil.copytree(toy_data, dest)
    for split in ("train", "val"):
        for p in sorted((dest / "cityscapes" / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))[n:]:
            p.unlink()
            (dest / "cityscapes" / "gtFine" / split / p.parent.name /
             p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")).unlink(missing_ok=True)
    return dest

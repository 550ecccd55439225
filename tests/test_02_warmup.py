"""Warm-up training (02_warmup.py) and the shared training loop: the loss falls, a killed
run resumes on schedule, torchrun with two gloo processes, non-finite losses stop."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import common
from conftest import ROOT, TINY_TRAIN, run_stage


def records(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_warmup_loss_falls_and_manifest(warmup_work):
    log = [r for r in records(warmup_work / "02_warmup" / "log.jsonl") if "loss_ce" in r]
    # 30 iterations from random weights at the paper's lr 5e-4, poly-decayed: the mean loss
    # of the last 10 falls by more than 10% from that of the first 10 (toy data of seed 0:
    # 2.68 -> 2.28); an optimizer that does not step stays at the first value's level
    assert len(log) >= 3 and log[-1]["loss_ce"] < 0.9 * log[0]["loss_ce"]
    m = json.loads((warmup_work / "02_warmup" / "manifest.json").read_text())
    assert m["complete"] and 0 <= m["summary"]["target_miou"] <= 100
    ck = torch.load(warmup_work / "02_warmup" / "model.pt", weights_only=False)
    assert ck["iteration"] == 30 and set(ck) >= {"model", "optimizer", "args", "best"}


def _cmd(data, work, iters, extra=()):
    return [sys.executable, str(ROOT / "02_warmup.py"), "--data", str(data), "--work", str(work),
            *TINY_TRAIN, "--iters", str(iters), "--save-every", "4", "--log-every", "2",
            "--eval-every", str(iters), "--source-eval", "0", *extra]


def test_killed_run_resumes_on_schedule(toy_data, warmup_work, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(warmup_work / "01_stylize", work / "01_stylize")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cmd(toy_data, work, 40), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = work / "02_warmup" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and torch.load(last, weights_only=False)["iteration"] >= 8:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=False)["iteration"]
    assert not (work / "02_warmup" / "manifest.json").exists()     # not 'complete'
    out = subprocess.run(_cmd(toy_data, work, 40), cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resuming from {last} at iteration {killed_at}" in out.stdout
    ck = torch.load(work / "02_warmup" / "model.pt", weights_only=False)
    assert ck["iteration"] == 40
    logged = [r for r in records(work / "02_warmup" / "log.jsonl") if "lr" in r]
    assert logged[-1]["iter"] == 40
    for r in logged:  # the poly schedule continues where it stopped
        assert r["lr"] == pytest.approx(common.poly_lr(5e-4, r["iter"] - 1, 40, 0.9))


def test_torchrun_two_gloo_processes(toy_data, warmup_work, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(warmup_work / "01_stylize", work / "01_stylize")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", *_cmd(toy_data, work, 4, ["--source-eval", "4"])[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    m = json.loads((work / "02_warmup" / "manifest.json").read_text())
    assert m["complete"] and torch.load(work / "02_warmup" / "model.pt", weights_only=False)["iteration"] == 4
    assert out.stdout.count("02_warmup: target val mIoU") == 1      # only rank 0 reports
    # the same command again: both ranks skip the source evaluation together (rank 0 read
    # the finished manifest), and the figures stay
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert again.stdout.count("from the finished run's manifest") == 1
    assert json.loads((work / "02_warmup" / "manifest.json").read_text())["summary"] == m["summary"]


def test_non_finite_loss_stops_with_iteration_and_losses(tmp_path):
    model = torch.nn.Conv2d(1, 1, 1)
    model.backbone_parameters = lambda: [model.weight]
    model.head_parameters = lambda: [model.bias]
    args = argparse.Namespace(lr=0.1, head_lr_mult=10, momentum=0.9, weight_decay=0.0, amp=False,
                              iters=10, power=0.9, warmup_iters=0, log_every=100, eval_every=100,
                              save_every=100, batch_size=1, source="gta5", eval_flip=False)

    def step_loss(it):
        x = model(torch.ones(1, 1, 1, 1)).sum()
        loss = x * (float("nan") if it == 3 else 1.0)
        return loss, {"loss_ce": loss.item(), "other": 0.5}
    with pytest.raises(common.NonFiniteLoss, match=r"iteration 3: loss_ce=nan, other=0.5"):
        common.train_loop(args, tmp_path, model, step_loss, [])


def test_rerunning_a_finished_warmup_keeps_its_source_figures(toy_data, warmup_work, tmp_path, monkeypatch):
    """The same arguments again on a finished 02: nothing is trained or evaluated again (the
    target figures come from log.jsonl, the source figures from the finished manifest), and
    the manifest reports the same figures."""
    work = tmp_path / "w"
    shutil.copytree(warmup_work / "01_stylize", work / "01_stylize")
    args = ["--data", toy_data, "--work", work, *TINY_TRAIN, "--iters", "4", "--eval-every", "4",
            "--source-eval", "4"]
    run_stage("02_warmup", *args)
    before = json.loads((work / "02_warmup" / "manifest.json").read_text())
    assert before["summary"]["source_miou"] is not None
    calls = []
    evaluate = common.evaluate

    def spy(*a, **k):
        calls.append(k.get("desc"))
        return evaluate(*a, **k)
    monkeypatch.setattr(common, "evaluate", spy)
    run_stage("02_warmup", *args)
    after = json.loads((work / "02_warmup" / "manifest.json").read_text())
    assert calls == []
    assert after["summary"] == before["summary"] and after["run_id"] == before["run_id"]
    # other arguments: a new run, evaluated again
    run_stage("02_warmup", *args[:-1], "3")
    assert calls.count("source eval") == 1

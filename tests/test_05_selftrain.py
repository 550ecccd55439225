"""Self-training losses and augmentation (05_selftrain.py, common.py), by hand."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

import common
from conftest import load_stage

st = load_stage("05_selftrain")
LOG2 = math.log(2)


def test_weighted_ce_eq10():
    logits = torch.zeros(1, 2, 1, 3)                     # p = 0.5 everywhere: -log p = log 2
    label = torch.tensor([[[0, 1, 255]]])
    w = torch.tensor([[[1.0, 0.5, 1.0]]])
    # (1 * log2 + 0.5 * log2) / 2 labelled pixels; the ignored pixel adds nothing
    assert common.weighted_ce(logits, label, w).item() == pytest.approx(1.5 * LOG2 / 2)
    assert common.weighted_ce(logits, label).item() == pytest.approx(LOG2)   # Eq. (2)
    logits = torch.tensor([[[[2.0]], [[0.0]]]])          # p_0 = e^2 / (e^2 + 1)
    assert common.weighted_ce(logits, torch.tensor([[[0]]]), torch.tensor([[[0.25]]])).item() == \
        pytest.approx(-0.25 * math.log(math.e ** 2 / (math.e ** 2 + 1)))


def test_symmetric_ce_eq11():
    logits = torch.zeros(1, 2, 1, 2)
    label = torch.tensor([[[0, 255]]])
    # CE = log 2; RCE = -(0.5 log 1 + 0.5 log 1e-4) = 0.5 * 9.2103 (the clamp at 1e-4)
    want = 0.1 * LOG2 + 1.0 * 0.5 * -math.log(1e-4)
    assert common.symmetric_ce(logits, label, 0.1, 1.0).item() == pytest.approx(want, rel=1e-6)
    # a confident correct prediction has RCE -> 0, CE -> 0
    sure = torch.tensor([[[[20.0]], [[-20.0]]]])
    assert common.symmetric_ce(sure, torch.tensor([[[0]]])).item() == pytest.approx(0, abs=1e-6)
    # all pixels ignored: zero, not NaN
    assert common.symmetric_ce(logits, torch.full((1, 1, 2), 255)).item() == 0


def test_kl_consistency_eq12():
    t = torch.zeros(1, 2, 1, 2)                                            # p~ = (0.5, 0.5)
    assert common.kl_divergence(t, t.clone()).item() == pytest.approx(0, abs=1e-7)
    s = torch.log(torch.tensor([0.25, 0.75])).view(1, 2, 1, 1).expand(1, 2, 1, 2)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert common.kl_divergence(t, s).item() == pytest.approx(want, rel=1e-6)
    # cut-out pixels are excluded: the mean is over kept pixels only
    s2 = s.clone()
    s2[..., 1] = torch.tensor([10.0, -10.0]).view(2, 1)                   # a wild pixel, masked out
    mask = torch.tensor([[[True, False]]])
    assert common.kl_divergence(t, s2, mask).item() == pytest.approx(want, rel=1e-6)


def test_ema_update():
    teacher, student = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(0.0)
        student.running_mean.fill_(3.0)
    st.ema_update(teacher, student, 0.9)
    assert teacher.weight.tolist() == pytest.approx([0.9, 0.9])
    assert teacher.running_mean.tolist() == [3.0, 3.0]      # buffers follow the student


def test_ramp_up():
    assert st.ramp_up(0, 100) == pytest.approx(math.exp(-5))
    assert st.ramp_up(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert st.ramp_up(100, 100) == 1.0 and st.ramp_up(5, 0) == 1.0


@pytest.mark.parametrize("op", list(st.PHOTOMETRIC_OPS))
def test_photometric_ops_keep_pixel_positions(op):
    torch.manual_seed(0)
    img = torch.zeros(3, 16, 16, dtype=torch.uint8)
    img[:, :, :8] = torch.tensor([40, 90, 200], dtype=torch.uint8).view(3, 1, 1)
    img[:, :, 8:] = torch.tensor([220, 120, 30], dtype=torch.uint8).view(3, 1, 1)
    img[:, 5, 3] = 255                                   # one marked pixel
    out = st.PHOTOMETRIC_OPS[op](img, 0.8)
    # regions that were uniform stay uniform (away from the edges, which sharpness may touch)
    right = out[:, :, 10:].flatten(1)
    marked = out[:, 5, 3].clone()
    keep = torch.ones(16, 6, dtype=torch.bool)
    keep[4:7, 2:5] = False
    assert (out[:, :, :6][:, keep] == out[:, 0, 0, None]).all()
    assert (right == right[:, :1]).all()
    if op not in ("identity",):
        assert out.shape == img.shape and out.dtype == torch.uint8
    # the marked pixel differs from its uniform neighbourhood wherever the op keeps contrast
    assert torch.equal(marked != out[:, 0, 0], (img[:, 5, 3] != img[:, 0, 0]) & (marked != out[:, 0, 0]))


def test_cutout_box_and_mask():
    torch.manual_seed(1)
    img = torch.full((3, 20, 30), 9, dtype=torch.uint8)
    out, keep = st.cutout(img, 0.5)
    box = ~keep
    assert 0 < box.sum() <= 10 * 15
    assert (out[:, box] != 9).all() and (out[:, keep] == 9).all()


def test_stm_map_follows_the_image_through_the_dataset(tmp_path):
    h, w = 30, 40
    xs = np.tile(np.arange(w, dtype=np.uint8) * 6, (h, 1))
    img = np.stack([xs, np.zeros_like(xs), np.zeros_like(xs)], -1)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray((np.arange(w, dtype=np.uint8)[None].repeat(h, 0) % 19)).save(tmp_path / "l.png")
    Image.fromarray(xs).save(tmp_path / "stm.png")
    ds = common.SegDataset([(tmp_path / "a.png", tmp_path / "l.png")], "trainid", crop=(24, 16),
                           scale=(0.5, 1.5), jitter=0.0, extra={"stm": lambda p: tmp_path / "stm.png"})
    for seed in range(8):
        torch.manual_seed(seed)
        b = ds[0]
        v = b["valid"]
        # same geometry: equal up to one source pixel (6 grey levels), since the image is
        # resized bilinearly and the map by nearest neighbour; a flip or shift would differ by far more
        assert (b["stm"][v].int() - b["image"][0][v].int()).abs().max() <= 6
        assert (b["label"][~v] == 255).all()

"""Distillation (06_distill.py): the KL term, the official form, flip-averaged labels."""
import math

import pytest
import torch
import torch.nn.functional as F

import common
from conftest import load_stage

ds = load_stage("06_distill")


def test_kl_zero_when_student_equals_teacher_and_hand_value():
    t = torch.randn(2, 19, 3, 4)
    assert ds.distill_kl(t, t.clone()).item() == pytest.approx(0, abs=1e-6)
    teach = torch.log(torch.tensor([0.5, 0.5])).view(1, 2, 1, 1)
    stud = torch.log(torch.tensor([0.2, 0.8])).view(1, 2, 1, 1)
    want = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert ds.distill_kl(teach, stud).item() == pytest.approx(want, rel=1e-6)
    # the same as torch's kl_div used as documented (log q as input, p as target)
    ref = F.kl_div(stud.log_softmax(1), teach.softmax(1), reduction="none").sum(1).mean()
    assert ds.distill_kl(teach, stud).item() == pytest.approx(ref.item(), rel=1e-6)


def test_official_form_reproduced():
    teach = torch.log(torch.tensor([0.5, 0.5])).view(1, 2, 1, 1)
    stud = torch.log(torch.tensor([0.2, 0.8])).view(1, 2, 1, 1)
    # kl_div(input = p_s, target = p_t) = sum_c p_t (log p_t - p_s): probabilities used as logs
    want = 0.5 * (math.log(0.5) - 0.2) + 0.5 * (math.log(0.5) - 0.8)
    assert ds.distill_kl(teach, stud, official=True).item() == pytest.approx(want, rel=1e-6)
    # and it is not a divergence: it is not 0 when the student equals the teacher
    assert ds.distill_kl(teach, teach.clone(), official=True).item() == pytest.approx(
        math.log(0.5) - 0.5, rel=1e-6)


def test_flip_averaged_pseudo_labels_are_flip_equivariant():
    torch.manual_seed(0)
    model = common.build_model("resnet18").eval()
    img = torch.randint(0, 256, (1, 3, 48, 72), dtype=torch.uint8)
    p = ds.teacher_probs(model, img)
    pf = ds.teacher_probs(model, img.flip(-1))
    assert torch.allclose(pf, p.flip(-1), atol=1e-6)
    lab, labf = ds.pseudo_label(p.clone()), ds.pseudo_label(pf.clone())
    assert (labf == lab[:, ::-1]).all()


def test_confidence_threshold():
    prob = torch.tensor([[0.9, 0.45], [0.1, 0.55]]).view(1, 2, 1, 2)
    assert ds.pseudo_label(prob.clone(), 0.6).tolist() == [[0, 255]]
    assert ds.pseudo_label(prob.clone(), 0.0).tolist() == [[0, 1]]

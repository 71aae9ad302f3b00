"""Contracts of `trainer.losses`: cross entropy with smoothing and class weights, distillation's
weighting and T^2 scaling (values and gradients), balanced class weights and top-k counting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses import balanced_weights, hard_loss, kd_loss, topk_correct

N, K = 16, 10


def logits(seed: int, scale: float = 3.0) -> Tensor:
    return scale * torch.randn(N, K, generator=torch.Generator().manual_seed(seed))


LABELS = torch.randint(0, K, (N,), generator=torch.Generator().manual_seed(99))


def kl_at(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), summed over classes, mean over rows,
    written out from the definition rather than through F.kl_div."""
    p_t = torch.softmax(teacher.double() / temperature, dim=1)
    p_s = torch.softmax(student.double() / temperature, dim=1)
    return (p_t * (p_t.log() - p_s.log())).sum(dim=1).mean()


def test_without_smoothing_the_hard_loss_is_plain_cross_entropy() -> None:
    s = logits(0)
    expected = F.cross_entropy(s, LABELS)
    assert torch.equal(hard_loss(s, LABELS, label_smoothing=0.0), expected)
    assert torch.equal(kd_loss(s, s, LABELS, temperature=4.0, alpha=0.0), expected)


def test_smoothing_mixes_in_the_uniform_target() -> None:
    s, eps = logits(1), 0.1
    log_p = torch.log_softmax(s, dim=1)
    nll = -log_p.gather(1, LABELS[:, None]).squeeze(1)
    expected = ((1 - eps) * nll - eps * log_p.mean(dim=1)).mean()
    assert hard_loss(s, LABELS, label_smoothing=eps).item() == pytest.approx(expected.item())


def test_class_weights_match_weighted_cross_entropy() -> None:
    s, w = logits(2), torch.linspace(0.5, 2.0, K)
    expected = F.cross_entropy(s, LABELS, weight=w)
    assert torch.allclose(hard_loss(s, LABELS, label_smoothing=0.0, weight=w), expected)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_a_student_equal_to_its_teacher_pays_only_the_hard_part(
    alpha: float, temperature: float
) -> None:
    s = logits(3)
    hard = F.cross_entropy(s, LABELS)
    got = kd_loss(s, s.clone(), LABELS, temperature=temperature, alpha=alpha)
    assert got.item() == pytest.approx((1 - alpha) * hard.item(), abs=1e-6)


@pytest.mark.parametrize("temperature", [2.0, 5.0])
def test_soft_term_is_t_squared_times_kl_at_temperature(temperature: float) -> None:
    s, t = logits(4), logits(5)
    got = kd_loss(s, t, LABELS, temperature=temperature, alpha=1.0)
    expected = temperature**2 * kl_at(s, t, temperature)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert got.item() > 0


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_loss_mixes_hard_and_soft_by_alpha(alpha: float) -> None:
    s, t, temperature = logits(6), logits(7), 3.0
    hard = F.cross_entropy(s.double(), LABELS)
    soft = temperature**2 * kl_at(s, t, temperature)
    got = kd_loss(s, t, LABELS, temperature=temperature, alpha=alpha)
    assert got.item() == pytest.approx(((1 - alpha) * hard + alpha * soft).item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 8.0])
def test_soft_gradient_is_t_times_the_softmax_difference(temperature: float) -> None:
    # d/ds [T^2 KL(p_t || p_s)] = T^2 * (p_s - p_t) / T / N: the T^2 factor makes the gradient
    # grow like T, cancelling the 1/T^2 by which softened targets shrink it (Hinton et al.).
    s, t = logits(8).requires_grad_(), logits(9)
    kd_loss(s, t, LABELS, temperature=temperature, alpha=1.0).backward()
    assert s.grad is not None
    p_s = torch.softmax(s.detach() / temperature, dim=1)
    p_t = torch.softmax(t / temperature, dim=1)
    expected = temperature * (p_s - p_t) / N
    assert torch.allclose(s.grad, expected, atol=1e-7, rtol=1e-4)


def test_teacher_gets_no_gradient_through_the_loss_it_was_given_detached() -> None:
    s = logits(10).requires_grad_()
    t = logits(11).requires_grad_()
    kd_loss(s, t.detach(), LABELS, temperature=4.0, alpha=0.5).backward()
    assert t.grad is None and s.grad is not None


def test_low_precision_logits_are_scored_in_float32() -> None:
    s = logits(12)
    got = kd_loss(s.bfloat16(), s.bfloat16(), LABELS, temperature=4.0, alpha=0.5)
    assert got.dtype == torch.float32


def test_balanced_weights_are_inverse_frequency_and_one_when_balanced() -> None:
    counts = torch.tensor([10, 30, 60])
    weights = balanced_weights(counts)
    assert torch.allclose(weights, torch.tensor([100 / 30, 100 / 90, 100 / 180]))
    # Every class then carries the same total weight, count * weight.
    assert torch.allclose(counts * weights, torch.full((3,), 100 / 3))
    assert torch.equal(balanced_weights(torch.tensor([7, 7, 7, 7])), torch.ones(4))


def test_an_empty_class_does_not_divide_by_zero() -> None:
    assert torch.isfinite(balanced_weights(torch.tensor([5, 0, 5]))).all()


def test_topk_counts_rows_whose_label_is_among_the_k_highest() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 1, 0])
    assert topk_correct(scores, labels, 1).item() == 1
    assert topk_correct(scores, labels, 2).item() == 2
    assert topk_correct(scores, labels, 5).item() == 3  # k is capped at the class count

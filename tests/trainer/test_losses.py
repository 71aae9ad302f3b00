"""Contracts of `trainer.losses`: cross entropy with smoothing and class weights, focal loss
(cross entropy at gamma 0, the written-out formula, down-weighting of easy images), distillation's
weighting and T^2 scaling (values and gradients), balanced class weights and top-k counting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.losses import balanced_weights, focal_loss, hard_loss, kd_loss, soft_loss, topk_correct

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


WEIGHT = torch.linspace(0.2, 5.0, K)  # far from uniform, so a misplaced weight would show


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_at_gamma_zero_is_cross_entropy_values_and_gradients(
    smoothing: float, weighted: bool
) -> None:
    weight = WEIGHT if weighted else None
    s_focal, s_ce = logits(13).requires_grad_(), logits(13).requires_grad_()
    focal = focal_loss(s_focal, LABELS, gamma=0.0, label_smoothing=smoothing, weight=weight)
    ce = F.cross_entropy(s_ce, LABELS, weight=weight, label_smoothing=smoothing)
    focal.backward()
    ce.backward()
    assert s_focal.grad is not None and s_ce.grad is not None
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)
    assert torch.allclose(s_focal.grad, s_ce.grad, rtol=1e-5, atol=1e-8)
    # The same through the trainer's entry point, which the step calls.
    via_hard = hard_loss(s_ce.detach(), LABELS, label_smoothing=smoothing, weight=weight,
                         focal_gamma=0.0)
    assert via_hard.item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("gamma", [0.5, 2.0, 5.0])
@pytest.mark.parametrize(("smoothing", "weighted"), [(0.0, False), (0.1, False), (0.1, True)])
def test_focal_is_the_written_out_formula(gamma: float, smoothing: float, weighted: bool) -> None:
    # -sum_c w_c q_c (1 - p_c)^gamma log p_c per row, summed and divided by the labels' total
    # weight (the row count without weights), in float64 from the definition.
    s = logits(14)
    p = torch.softmax(s.double(), dim=1)
    q = torch.full((N, K), smoothing / K, dtype=torch.float64)
    q[torch.arange(N), LABELS] += 1 - smoothing
    w = WEIGHT.double() if weighted else torch.ones(K, dtype=torch.float64)
    expected = -(w * q * (1 - p) ** gamma * p.log()).sum() / w[LABELS].sum()
    got = focal_loss(s, LABELS, gamma=gamma, label_smoothing=smoothing,
                     weight=WEIGHT if weighted else None)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_scales_each_image_by_its_miss_probability_to_the_gamma() -> None:
    # Without smoothing each row's focal loss is (1 - p_label)^gamma times its cross entropy:
    # never more, and far less for the images the model already gets right.
    s, gamma = logits(15), 2.0
    per_row_ce = F.cross_entropy(s, LABELS, reduction="none")
    per_row_focal = torch.stack([
        focal_loss(s[i : i + 1], LABELS[i : i + 1], gamma=gamma) for i in range(N)
    ])  # fmt: skip
    p_label = torch.softmax(s, dim=1)[torch.arange(N), LABELS]
    assert torch.allclose(per_row_focal, (1 - p_label) ** gamma * per_row_ce, rtol=1e-4)
    assert (per_row_focal <= per_row_ce).all()


def test_focal_gradient_shifts_weight_from_easy_to_hard_images() -> None:
    # One easy image (label logit far ahead) and one hard (label logit behind): the share of
    # the total gradient norm that the hard image gets grows from cross entropy to focal.
    s = torch.tensor([[6.0, 0.0, 0.0], [0.0, 1.5, 0.0]])
    y = torch.tensor([0, 0])

    def hard_share(gamma: float | None) -> float:
        x = s.clone().requires_grad_()
        hard_loss(x, y, label_smoothing=0.0, focal_gamma=gamma).backward()
        assert x.grad is not None
        easy, hard = x.grad.norm(dim=1).tolist()
        return hard / (easy + hard)

    ce, focal = hard_share(None), hard_share(2.0)
    assert focal > ce
    assert focal > 0.999  # (1 - p)^2 with p ~ 0.995 leaves the easy image ~2.5e-5 of its pull


@pytest.mark.parametrize("gamma", [0.25, 2.0])
def test_focal_gradient_is_finite_where_the_softmax_saturates(gamma: float) -> None:
    # float32 rounds p to exactly 1 at a margin of ~100; d/dx x^gamma at x = 0 is infinite for
    # gamma < 1, and the loss must not turn a confident image into a NaN step.
    s = torch.tensor([[200.0, 0.0, -50.0], [0.0, 3.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    loss = focal_loss(s, y, gamma=gamma, label_smoothing=0.1, weight=torch.tensor([1.0, 2, 3]))
    loss.backward()
    assert s.grad is not None
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_with_distillation_focal_replaces_only_the_hard_term(alpha: float) -> None:
    s, t, temperature = logits(16), logits(17), 3.0
    focal = focal_loss(s, LABELS, gamma=2.0, label_smoothing=0.1, weight=WEIGHT)
    soft = soft_loss(s, t, temperature=temperature)
    got = kd_loss(s, t, LABELS, temperature=temperature, alpha=alpha, label_smoothing=0.1,
                  weight=WEIGHT, focal_gamma=2.0)
    assert got.item() == pytest.approx(((1 - alpha) * focal + alpha * soft).item(), rel=1e-5)


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

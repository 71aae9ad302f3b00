"""Loss functions: cross entropy or focal loss, with smoothing and class weights, and knowledge
distillation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def hard_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    label_smoothing: float,
    weight: Tensor | None = None,
    focal_gamma: float | None = None,
) -> Tensor:
    """The loss against the labels: cross entropy, or `focal_loss` when `focal_gamma` is given."""
    if focal_gamma is not None:
        return focal_loss(logits, labels, gamma=focal_gamma, label_smoothing=label_smoothing,
                          weight=weight)
    return F.cross_entropy(
        logits.float(), labels, weight=weight, label_smoothing=label_smoothing
    )


def focal_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    gamma: float,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Focal loss (Lin et al. 2017) generalised the way torch's cross entropy generalises NLL.

    Per image: -sum_c w_c q_c (1 - p_c)^gamma log p_c, with q the smoothed target (1 - eps on the
    label, plus eps / C on every class), p the softmax and w the class weights (focal's alpha,
    1 without weights). Reduced as `F.cross_entropy` reduces: the mean over images, or, with
    weights, the sum divided by the labels' total weight. So gamma = 0 is exactly
    `F.cross_entropy(logits, labels, weight, label_smoothing)`, and the step's micro-batch
    shares (trainer/step.py) hold for it unchanged. Every class term is modulated by its own
    (1 - p_c)^gamma, so the smoothing mass on classes the model already rules out (p_c ~ 0)
    keeps its full cross-entropy pull: smoothing means what it means without focal.
    """
    log_p = F.log_softmax(logits.float(), dim=1)
    target = F.one_hot(labels, log_p.shape[1]).to(log_p.dtype)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / log_p.shape[1]
    terms = -target * log_p
    if gamma != 0:
        # -expm1(log p) is 1 - p without the cancellation of 1 - exp(log p) near p = 1; the
        # floor keeps d/dx x^gamma finite where a float32 softmax rounds p to exactly 1.
        miss = (-torch.expm1(log_p)).clamp(min=torch.finfo(log_p.dtype).tiny)
        terms = terms * miss.pow(gamma)
    if weight is None:
        return terms.sum(dim=1).mean()
    return (terms * weight.to(terms.dtype)).sum() / weight[labels].sum()


def kd_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
    focal_gamma: float | None = None,
) -> Tensor:
    """(1 - alpha) * hard loss + alpha * T^2 * KL(teacher_T || student_T).

    The T^2 factor (Hinton et al. 2015) keeps the soft term's gradient on the same scale as the
    hard term's whatever the temperature, so alpha means the same thing at every T. With
    `focal_gamma` the hard term is `focal_loss`; the soft term stays the KL term.
    """
    hard = hard_loss(student, labels, label_smoothing=label_smoothing, weight=weight,
                     focal_gamma=focal_gamma)
    if alpha == 0:
        return hard
    return (1.0 - alpha) * hard + alpha * soft_loss(student, teacher, temperature=temperature)


def soft_loss(student: Tensor, teacher: Tensor, *, temperature: float) -> Tensor:
    """T^2 * KL(teacher_T || student_T), a mean over the batch's images: `kd_loss`'s soft term."""
    log_p_student = F.log_softmax(student.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return temperature**2 * kl


def balanced_weights(class_counts: Tensor) -> Tensor:
    """Inverse class frequency, scaled so a balanced dataset gets weight 1 for every class."""
    counts = class_counts.float().clamp(min=1)
    return counts.sum() / (len(counts) * counts)


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """How many rows have their label among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == labels[:, None]).any(dim=1).sum()

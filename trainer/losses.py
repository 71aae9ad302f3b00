"""Loss functions: cross entropy with smoothing and class weights, and knowledge distillation."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def hard_loss(
    logits: Tensor, labels: Tensor, *, label_smoothing: float, weight: Tensor | None = None
) -> Tensor:
    return F.cross_entropy(
        logits.float(), labels, weight=weight, label_smoothing=label_smoothing
    )


def kd_loss(
    student: Tensor,
    teacher: Tensor,
    labels: Tensor,
    *,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    """(1 - alpha) * hard loss + alpha * T^2 * KL(teacher_T || student_T).

    The T^2 factor (Hinton et al. 2015) keeps the soft term's gradient on the same scale as the
    hard term's whatever the temperature, so alpha means the same thing at every T.
    """
    hard = hard_loss(student, labels, label_smoothing=label_smoothing, weight=weight)
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

"""Evaluation: loss, top-1/top-5 on a split, and the test report (per-class F1, confusion)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.augment import eval_transform
from trainer.data import ImageData
from trainer.device import Runtime, autocast
from trainer.losses import topk_correct


def evaluate(
    model: nn.Module,
    data: ImageData,
    split: str,
    rt: Runtime,
    *,
    batch_size: int,
    mean: Tensor,
    std: Tensor,
    confusion: bool = False,
) -> dict[str, Any]:
    """Mean cross entropy, top-1 and top-5 accuracy of `model` on `split` ("val" or "test").
    No batch waits for the device: the sums stay there until the split is done."""
    model.eval()
    n, loss_sum = 0, torch.zeros((), device=rt.device)
    top1 = torch.zeros((), dtype=torch.long, device=rt.device)
    top5 = torch.zeros((), dtype=torch.long, device=rt.device)
    k = data.num_classes
    matrix = torch.zeros(k * k, dtype=torch.long, device=rt.device)
    with torch.inference_mode(), autocast(rt):
        for x, y in data.eval_batches(split, batch_size):
            inputs = eval_transform(x, mean=mean, std=std)
            if rt.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            logits = model(inputs).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            top1 += topk_correct(logits, y, 1)
            top5 += topk_correct(logits, y, 5)
            if confusion:
                # index_add_, not bincount: on CUDA bincount reads the largest index on the
                # host to size its output, a synchronisation per batch.
                matrix.index_add_(0, y * k + logits.argmax(1), torch.ones_like(y))
            n += len(y)
    # The totals stay on the device through the loop; the host reads them once, here.
    loss_total, top1_total, top5_total = torch.stack(
        [loss_sum.double(), top1.double(), top5.double()]).tolist()
    out: dict[str, Any] = {
        "loss": loss_total / max(n, 1),
        "acc": top1_total / max(n, 1),
        "top5": top5_total / max(n, 1),
    }
    if confusion:
        cm = matrix.view(k, k).cpu()
        out["confusion"] = cm.tolist()
        out["f1"] = per_class_f1(cm)
        out["macro_f1"] = sum(out["f1"]) / k
    return out


def as_test_metrics(test: dict[str, Any]) -> dict[str, Any]:
    """`evaluate(..., confusion=True)` of the test split under the names `Result` gives them."""
    return {
        "test_acc": test["acc"], "test_top5": test["top5"], "test_loss": test["loss"],
        "test_macro_f1": test["macro_f1"], "test_f1": test["f1"], "confusion": test["confusion"],
    }


def per_class_f1(confusion: Tensor) -> list[float]:
    """F1 of each class from a confusion matrix (rows: true class, columns: predicted)."""
    tp = confusion.diag().double()
    predicted = confusion.sum(0).double()
    actual = confusion.sum(1).double()
    denom = predicted + actual
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    return f1.tolist()

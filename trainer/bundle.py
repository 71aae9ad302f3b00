"""A servable model: one or several trained checkpoints behind one function of an image batch.

`ServingModule` is what every consumer runs (the server, the ensemble evaluation, the TorchScript
and ONNX exports): it takes float32 NCHW pixels in [0, 1] at the training size, normalises them
with each member's own training statistics, and returns the log of the members' averaged softmax.
Log-probabilities rather than probabilities, so `trainer.evaluate` (cross entropy, top-k) works on
it unchanged; `exp` of the output is the averaged softmax.

An export folder holds either one model (`best.pt` + `config.json`, what `hpo export` always
wrote) or an ensemble: a `config.json` with `"kind": "ensemble"` and one such folder per member.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer import checkpoint
from trainer.config import ConfigError
from trainer.saved_model import load_model

CONFIG = "config.json"
ENSEMBLE = "ensemble"


class ServingModule(nn.Module):
    """Members' softmax averaged; input in [0, 1], output log-probabilities (N, classes)."""

    # (members, 1, C, 1, 1) buffers, declared for the type checker: register_buffer sets them,
    # and nn.Module's __getattr__ is typed Tensor | Module.
    mean: Tensor
    std: Tensor

    def __init__(self, models: list[nn.Module], means: list[list[float]],
                 stds: list[list[float]], image_size: int) -> None:
        super().__init__()
        self.image_size = image_size  # the input's height and width
        self.members = nn.ModuleList(models)
        # Buffers, so TorchScript and ONNX carry the statistics inside the graph.
        self.register_buffer("mean", torch.tensor(means, dtype=torch.float32)[:, None, :, None,
                                                                              None])
        self.register_buffer("std", torch.tensor(stds, dtype=torch.float32)[:, None, :, None,
                                                                            None])

    def forward(self, x: Tensor) -> Tensor:
        probs = None
        for i, member in enumerate(self.members):
            p = torch.softmax(member((x - self.mean[i]) / self.std[i]).float(), dim=1)
            probs = p if probs is None else probs + p
        assert probs is not None
        return torch.log((probs / len(self.members)).clamp_min(1e-30))


@dataclass
class Bundle:
    """A ServingModule with what a user of it must know: classes, input shape, provenance."""

    module: ServingModule
    classes: list[str]
    image_size: int
    in_channels: int
    record: dict[str, Any]  # the data split (trainer.datasets.split_record)
    members: list[dict[str, Any]]  # per member: study, stage, trial, value, metrics
    info: dict[str, Any] = field(default_factory=dict)  # the export's config.json, if any

    @property
    def kind(self) -> str:
        return ENSEMBLE if len(self.members) > 1 else "single"

    def describe(self) -> dict[str, Any]:
        """What `GET /model` answers: provenance, metrics, classes and the preprocessing."""
        head = self.members[0]
        return {
            "kind": self.kind, "study": head.get("study"), "stage": head.get("stage"),
            "trial": head.get("trial"), "value": head.get("value"),
            "metrics": self.info.get("test_metrics") or head.get("metrics", {}),
            "members": self.members, "classes": self.classes, "num_classes": len(self.classes),
            "input": {"channels": self.in_channels, "height": self.image_size,
                      "width": self.image_size},
            "preprocessing": {
                "mode": "L (grayscale)" if self.in_channels == 1 else "RGB",
                "resize": f"bilinear (antialiased) to {self.image_size}x{self.image_size},"
                          " aspect ratio not kept, as in training",
                "scale": "pixel / 255",
                "normalise": [{"mean": mean.flatten().tolist(), "std": std.flatten().tolist()}
                              for mean, std in zip(self.module.mean, self.module.std,
                                                   strict=True)],
            },
            "dataset": self.record.get("dataset"),
        }


def from_checkpoints(paths: list[Path], members: list[dict[str, Any]],
                     device: torch.device | str = "cpu") -> Bundle:
    """Members from their `best.pt` files; all must predict the same classes from the same
    input shape, or averaging their softmax would be meaningless."""
    models, means, stds, facts_of, payloads = [], [], [], [], []
    for path in paths:
        model, payload = load_model(path, torch.device(device))
        facts = payload["data"]
        payloads.append(payload)
        models.append(model)
        means.append(list(facts["mean"]))
        stds.append(list(facts["std"]))
        facts_of.append(facts)
    # Metrics as the checkpoint recorded them (the best epoch's), where the caller has none.
    members = [{"metrics": dict(p.get("metrics", {})), **m} if "metrics" not in m else m
               for m, p in zip(members, payloads, strict=True)]
    first = facts_of[0]
    for path, facts in zip(paths[1:], facts_of[1:], strict=True):
        for key in ("classes", "in_channels", "image_size", "split"):
            mine = facts["record"].get("sha256") if key == "split" else facts[key]
            theirs = first["record"].get("sha256") if key == "split" else first[key]
            if mine != theirs:
                raise ConfigError(
                    f"ensemble member {str(path)!r} has {key} {mine!r}, but the first"
                    f" member has {theirs!r}; ensemble models trained on the same data split"
                )
    size = int(first["image_size"])
    return Bundle(ServingModule(models, means, stds, size), classes=list(first["classes"]),
                  image_size=size, in_channels=int(first["in_channels"]),
                  record=dict(first["record"]), members=members)


def read_info(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        raise ConfigError(f"{str(folder)!r} is not an export folder: it has no {CONFIG}")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(info, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object")
    return info


def member_folders(folder: Path) -> list[Path]:
    """The model folders of an export: itself for one model, each member's for an ensemble."""
    info = read_info(folder)
    if info.get("kind") != ENSEMBLE:
        return [folder]
    return [folder / m["dir"] for m in info["members"]]


def load_export(folder: str | Path, device: torch.device | str = "cpu") -> Bundle:
    """The Bundle of an export folder (`hpo export` or `hpo export --top K`)."""
    folder = Path(folder)
    if folder.is_file() and folder.name == checkpoint.BEST:
        folder = folder.parent
    info = read_info(folder)
    members = []
    for sub in member_folders(folder):
        meta = read_info(sub)
        members.append({k: meta.get(k) for k in ("study", "stage", "trial", "value")}
                       | {"metrics": meta.get("metrics", {})})
    bundle = from_checkpoints([f / checkpoint.BEST for f in member_folders(folder)], members,
                              device)
    bundle.info = info
    return bundle

"""Deliberately broken model packages, for the tests and the gate benchmark: what the comparison gate
must catch before a bad training run reaches users."""

from __future__ import annotations

from pathlib import Path

import torch

from examples.movielens.checkpoint import load_checkpoint
from examples.movielens.export import export_model
from examples.movielens.train import checkpoint_of


def collapsed_package(src: Path, root: Path, scale: float = 1e-4) -> Path:
    """The MovieLens package `src` (or a training checkpoint) with its item tower's last layer shrunk
    to (almost) its bias: every item embeds to nearly the same unit vector, as after a collapse in
    training. A valid package of the same family, exported under `root` with its own version; the
    user tower and the scorer are untouched."""
    ck = load_checkpoint(checkpoint_of(Path(src), Path(root)))
    last = ck.model.item_tower.mlp[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.copy_(torch.linspace(-1.0, 1.0, last.bias.numel()))
    metadata = {"derived_from": ck.version, "degraded": f"item tower collapsed (last layer x {scale})"}
    return export_model(ck.model, Path(root), family=ck.family, metadata=metadata)


collapsed_checkpoint = collapsed_package  # the name the tests used before packages

"""Deliberately broken checkpoints, for the tests and the gate benchmark: what the comparison gate
must catch before a bad training run reaches users."""

from __future__ import annotations

from pathlib import Path

import torch

from core.checkpoint import load_checkpoint, save_checkpoint


def collapsed_checkpoint(src: Path, root: Path, scale: float = 1e-4) -> Path:
    """`src` with its item tower's last layer shrunk to (almost) its bias: every item embeds to nearly
    the same unit vector, as after a collapse in training. A valid checkpoint of the same family, with
    its own version; the user tower is untouched."""
    ck = load_checkpoint(src)
    last = ck.model.item_tower.mlp[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        last.bias.copy_(torch.linspace(-1.0, 1.0, last.bias.numel()))
    training = {"derived_from": ck.version, "degraded": f"item tower collapsed (last layer x {scale})"}
    return save_checkpoint(ck.model, root, family=ck.family, training=training, metrics={})

"""The MovieLens model's TRAINING checkpoints: a directory named by its version, holding `weights.pt`
(the eager TwoTower's state_dict) and `manifest.json`. Jobs never read these: examples/movielens/export.py
turns one into a model package.

The version IS the content hash of the weights file, so two checkpoints with equal versions are
byte-identical and a flipped byte is caught at load. Nothing ever writes into a published checkpoint:
it is staged in a temp directory and renamed into place once complete.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from core.storage.fsutil import commit_dir, sha256_file, staging_dir
from examples.movielens.features import FeatureSchema, schema_diff
from examples.movielens.model import ModelConfig, TwoTower

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupted or incompatible; the message names expected vs actual."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    manifest: dict
    model: TwoTower

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def family(self) -> str:
        return self.manifest["family"]

    @property
    def schema(self) -> FeatureSchema:
        return self.model.schema


def save_checkpoint(
    model: TwoTower,
    root: Path,
    *,
    family: str,
    training: dict,
    metrics: dict,
) -> Path:
    """Write `model` as a new immutable checkpoint under `root`; returns its directory
    (`root/<family>-<hash12>`). Saving an identical model twice returns the existing directory."""
    root = Path(root)
    tmp = staging_dir(root / "checkpoint")
    torch.save(model.state_dict(), tmp / WEIGHTS)
    digest = sha256_file(tmp / WEIGHTS)
    version = f"{family}-{digest[:12]}"
    manifest = {
        "format_version": FORMAT_VERSION,
        "kind": "skewless.checkpoint",
        "family": family,
        "version": version,
        "weights_sha256": digest,
        "embed_dim": model.cfg.embed_dim,
        "model_config": model.cfg.to_dict(),
        "feature_schema": model.schema.to_dict(),
        "training": training,
        "metrics": metrics,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    final = root / version
    if final.exists():
        log.info("checkpoint %s already exists; keeping the existing copy", final)
        shutil.rmtree(tmp)
        return final
    commit_dir(tmp, final)
    return final


def read_manifest(path: Path) -> dict:
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not mf.is_file():
        raise CheckpointError(
            f"checkpoint {path} has no {MANIFEST}; expected a directory written by examples.movielens.train"
        )
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint manifest {mf} is not valid JSON: {e}") from e
    if manifest.get("kind") != "skewless.checkpoint" or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{mf}: expected kind 'skewless.checkpoint' format {FORMAT_VERSION}, "
            f"got kind {manifest.get('kind')!r} format {manifest.get('format_version')!r}"
        )
    return manifest


def load_checkpoint(path: Path, expected_schema: FeatureSchema | None = None) -> Checkpoint:
    """Load and verify: weights hash == manifest, and (if given) feature schema == expected."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS}")
    actual = sha256_file(weights)
    if actual != manifest["weights_sha256"]:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: weights sha256 expected {manifest['weights_sha256']}, got {actual}"
        )
    schema = FeatureSchema.from_dict(manifest["feature_schema"])
    if expected_schema is not None and schema != expected_schema:
        # the caller's schema (the data's) is what is expected; the checkpoint's is what arrived
        diffs = "; ".join(schema_diff(expected_schema, schema))
        raise CheckpointError(
            f"feature schema mismatch: the data's schema (expected) vs checkpoint {manifest['version']} (actual): {diffs}"
        )
    model = TwoTower(schema, ModelConfig.from_dict(manifest["model_config"]))
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return Checkpoint(path=path, manifest=manifest, model=model)

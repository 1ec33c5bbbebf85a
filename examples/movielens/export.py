"""The MovieLens two-tower model as a model package: its towers behind keyword `forward`s that take the
catalog's and users' columns as they are stored (raw ids hashed inside the graph, the same hash the
training used), the declared inputs, and the scorer split for broadcast.

  python -m examples.movielens.export --checkpoint checkpoints/ml-two-tower-<A> --out packages

(examples.movielens.train exports every checkpoint it writes; this re-exports one.) The package's
metadata records the checkpoint's version and absolute path, which `train --init-from PACKAGE` follows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from core.contract.package import write_package
from core.contract.spec import InputSpec
from examples.movielens.checkpoint import load_checkpoint
from examples.movielens.features import FeatureSchema
from examples.movielens.model import TwoTower

# Raw ids are hashed inside the graph, so any non-negative int64 id is in range.
ANY_ID = 1 << 62
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)  # the uint64 multiplier of features.bucket_ids, as int64


def bucket(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """features.bucket_ids in int64 tensor ops: the product wraps like uint64, `>> 20` is made logical
    by the mask, so every id lands in the same embedding row as in training."""
    h = ((ids * _GOLDEN) >> 20) & ((1 << 44) - 1)
    return 1 + h % (buckets - 1)


def item_inputs(schema: FeatureSchema) -> list[InputSpec]:
    return [
        InputSpec("item_id", "int64", vocab=ANY_ID),
        InputSpec("genre_ids", "int64", "ragged", max_len=schema.n_genre_slots, vocab=schema.n_genre_slots),
        InputSpec("year_slot", "int64", vocab=schema.n_year_slots),
        InputSpec(
            "title_tokens", "int64", "ragged", max_len=schema.max_title_tokens, vocab=schema.title_buckets
        ),
        InputSpec("tag_tokens", "int64", "ragged", max_len=schema.max_tag_tokens, vocab=schema.tag_buckets),
    ]


def user_inputs(schema: FeatureSchema) -> list[InputSpec]:
    return [
        InputSpec("user_id", "int64", vocab=ANY_ID),
        InputSpec("history", "int64", "ragged", max_len=schema.history_len, vocab=ANY_ID),
    ]


class ItemProgram(nn.Module):
    def __init__(self, model: TwoTower):
        super().__init__()
        self.tower, self.buckets = model.item_tower, model.schema.item_id_buckets

    def forward(self, item_id, genre_ids, genre_ids_offsets, year_slot, title_tokens, title_tokens_offsets,
                tag_tokens, tag_tokens_offsets):  # fmt: skip
        t = self.tower
        h = torch.cat([t.id_emb(bucket(item_id, self.buckets)), t.genre_bag(genre_ids, genre_ids_offsets),
                       t.year_emb(year_slot), t.title_bag(title_tokens, title_tokens_offsets),
                       t.tag_bag(tag_tokens, tag_tokens_offsets)], dim=1)  # fmt: skip
        return F.normalize(t.mlp(h), dim=1)  # (N, D)


class UserProgram(nn.Module):
    def __init__(self, model: TwoTower):
        super().__init__()
        self.tower, self.schema = model.user_tower, model.schema

    def forward(self, user_id, history, history_offsets):
        t, s = self.tower, self.schema
        h = torch.cat([t.id_emb(bucket(user_id, s.user_id_buckets)),
                       t.hist_bag(bucket(history, s.item_id_buckets), history_offsets)], dim=1)  # fmt: skip
        return F.normalize(t.mlp(h), dim=1)  # (U, D)


class ScorerUser(nn.Module):
    def __init__(self, model: TwoTower):
        super().__init__()
        self.scorer = model.scorer

    def forward(self, user):
        return self.scorer.user_side(user)  # (U, H)


class ScorerPair(nn.Module):
    def __init__(self, model: TwoTower):
        super().__init__()
        self.scorer = model.scorer

    def forward(self, user, user_side, item):
        return self.scorer.pair_side(user, user_side, item)  # (R,)


def export_model(model: TwoTower, out: Path, *, family: str, metadata: dict) -> Path:
    """An eager TwoTower -> a model package under `out` (its directory is returned)."""
    model = model.eval()
    return write_package(
        out,
        family=family,
        item_tower=ItemProgram(model),
        user_tower=UserProgram(model),
        item_inputs=item_inputs(model.schema),
        user_inputs=user_inputs(model.schema),
        similarity="cosine",
        scorer_user=ScorerUser(model),
        scorer_pair=ScorerPair(model),
        metadata={"example": "examples.movielens", **metadata},
    )


def export(checkpoint: Path, out: Path) -> Path:
    """A training checkpoint (examples.movielens.checkpoint) -> a model package under `out`."""
    ck = load_checkpoint(checkpoint)
    return export_model(
        ck.model,
        out,
        family=ck.family,
        metadata={
            "checkpoint": ck.version,
            "checkpoint_path": str(Path(checkpoint).resolve()),
            "feature_schema": ck.schema.to_dict(),
            "training": ck.manifest.get("training", {}),
            "metrics": ck.manifest.get("metrics", {}),
        },
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m examples.movielens.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument(
        "--checkpoint", type=Path, required=True, help="a checkpoint written by examples.movielens.train"
    )
    p.add_argument(
        "--out", type=Path, default=Path("packages"), help="where the package directory is written"
    )
    a = p.parse_args(argv)
    print(export(a.checkpoint, a.out))


if __name__ == "__main__":
    main()

"""The MovieLens model: two towers and the ranking scorer (eager modules, for training; jobs and serving
run the exported package, examples/movielens/export.py).

The user side is deliberately split out (`UserTower`, `RankingScorer.user_side`) so serving can run it
ONCE per unique user in a batch and broadcast the result to that user's candidate rows.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pyarrow as pa
import torch
from torch import nn
from torch.nn import functional as F

from examples.movielens.features import FeatureSchema, bucket_ids, list_column_to_bag


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    embed_dim: int = 64
    field_dim: int = 32
    hidden: tuple[int, ...] = (256, 128)
    ranker_hidden: int = 64
    # The ranker's user-context network: it depends on the user only, so serving runs it once per unique
    # user of a batch (broadcast) instead of once per candidate row. () = one linear layer.
    ranker_user_hidden: tuple[int, ...] = (1024, 1024)
    temperature: float = 0.05

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["ranker_user_hidden"] = list(self.ranker_user_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["hidden"] = tuple(d["hidden"])
        # checkpoints written before the user-context network existed had a single linear layer
        d["ranker_user_hidden"] = tuple(d.get("ranker_user_hidden", ()))
        return cls(**d)


def _mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


@dataclasses.dataclass
class ItemInputs:
    id_rows: torch.Tensor  # (N,) int64 bucketed item ids
    genre_vals: torch.Tensor  # (G,) flat genre ids
    genre_offs: torch.Tensor  # (N,)
    year_slot: torch.Tensor  # (N,)
    title_vals: torch.Tensor
    title_offs: torch.Tensor
    tag_vals: torch.Tensor
    tag_offs: torch.Tensor

    def to(self, device: torch.device | str) -> ItemInputs:
        return ItemInputs(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


@dataclasses.dataclass
class UserInputs:
    id_rows: torch.Tensor  # (U,) int64 bucketed user ids
    hist_vals: torch.Tensor  # (H,) bucketed item ids of the history, flat
    hist_offs: torch.Tensor  # (U,)

    def to(self, device: torch.device | str) -> UserInputs:
        return UserInputs(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def _tensor(a: np.ndarray) -> torch.Tensor:
    """Share (read-only) Arrow/numpy buffers without a copy; nothing writes to model inputs, so
    torch's non-writable-array warning does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(a)


def item_inputs_from_arrow(table: pa.Table, schema: FeatureSchema) -> ItemInputs:
    """Encoded catalog columns (see features.ITEM_FEATURE_COLUMNS) -> tensors. No Python loop per row."""
    gv, go = list_column_to_bag(table.column("genre_ids"))
    tv, to = list_column_to_bag(table.column("title_tokens"))
    kv, ko = list_column_to_bag(table.column("tag_tokens"))
    ids = table.column("item_id").to_numpy()
    year = table.column("year_slot").to_numpy(zero_copy_only=False).astype(np.int64)
    t = _tensor
    return ItemInputs(
        t(bucket_ids(ids, schema.item_id_buckets)), t(gv), t(go), t(year), t(tv), t(to), t(kv), t(ko)
    )


def user_inputs_from_lists(
    user_ids: np.ndarray, histories: list[np.ndarray] | pa.Array | pa.ChunkedArray, schema: FeatureSchema
) -> UserInputs:
    """User ids and their histories (item ids, most recent last) -> tensors; keeps the last
    `schema.history_len` items of each history. Arrow list columns are handled without a row loop."""
    if isinstance(histories, pa.Array | pa.ChunkedArray):
        values, starts = list_column_to_bag(histories)
        ends = np.append(starts[1:], len(values))
    else:
        lens_all = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
        ends = np.cumsum(lens_all)
        starts = ends - lens_all
        values = np.concatenate(histories).astype(np.int64) if len(histories) else np.zeros(0, np.int64)
    keep_from = np.maximum(starts, ends - schema.history_len)
    lens = ends - keep_from
    offs = np.zeros(len(lens), dtype=np.int64)
    np.cumsum(lens[:-1], out=offs[1:])
    flat = values[np.repeat(keep_from - offs, lens) + np.arange(int(lens.sum()))]
    t = _tensor
    return UserInputs(
        t(bucket_ids(np.asarray(user_ids, dtype=np.int64), schema.user_id_buckets)),
        t(bucket_ids(flat, schema.item_id_buckets)),
        t(offs),
    )


class ItemTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: ModelConfig):
        super().__init__()
        f = cfg.field_dim
        self.id_emb = nn.Embedding(schema.item_id_buckets, f)
        self.genre_bag = nn.EmbeddingBag(schema.n_genre_slots, f, mode="mean")
        self.year_emb = nn.Embedding(schema.n_year_slots, f)
        self.title_bag = nn.EmbeddingBag(schema.title_buckets, f, mode="mean")
        self.tag_bag = nn.EmbeddingBag(schema.tag_buckets, f, mode="mean")
        self.mlp = _mlp(5 * f, cfg.hidden, cfg.embed_dim)

    def forward(self, x: ItemInputs) -> torch.Tensor:  # (N, D), unit norm
        h = torch.cat(
            [
                self.id_emb(x.id_rows),
                self.genre_bag(x.genre_vals, x.genre_offs),
                self.year_emb(x.year_slot),
                self.title_bag(x.title_vals, x.title_offs),
                self.tag_bag(x.tag_vals, x.tag_offs),
            ],
            dim=1,
        )
        return F.normalize(self.mlp(h), dim=1)


class UserTower(nn.Module):
    """User-id embedding lookup + mean-pooled history + MLP: all user-only computation."""

    def __init__(self, schema: FeatureSchema, cfg: ModelConfig):
        super().__init__()
        f = cfg.field_dim
        self.id_emb = nn.Embedding(schema.user_id_buckets, f)
        self.hist_bag = nn.EmbeddingBag(schema.item_id_buckets, 2 * f, mode="mean", padding_idx=0)
        self.mlp = _mlp(3 * f, cfg.hidden, cfg.embed_dim)

    def forward(self, x: UserInputs) -> torch.Tensor:  # (U, D), unit norm
        h = torch.cat([self.id_emb(x.id_rows), self.hist_bag(x.hist_vals, x.hist_offs)], dim=1)
        return F.normalize(self.mlp(h), dim=1)


class RankingScorer(nn.Module):
    """score(u, i) = <u, i> / T + v . relu(f(u) + W_i i + W_x (u * i)), f = the user-context MLP.

    `user_side` (f(u)) depends only on the user and holds most of the FLOPs (2.4 MFLOP per user with the
    default (1024, 1024) hidden sizes, against 16 kFLOP per row for `pair_side`): serving runs it once per
    unique user and broadcasts it to the candidate rows. The retrieval dot product stays the dominant term, so ranking
    and retrieval agree on what is relevant.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.embed_dim, cfg.ranker_hidden
        self.inv_temperature = 1.0 / cfg.temperature
        self.w_user = _mlp(d, cfg.ranker_user_hidden, h) if cfg.ranker_user_hidden else nn.Linear(d, h)
        self.w_item = nn.Linear(d, h, bias=False)
        self.w_cross = nn.Linear(d, h, bias=False)
        self.v = nn.Linear(h, 1, bias=False)

    def user_side(self, u: torch.Tensor) -> torch.Tensor:  # (U, D) -> (U, H)
        return self.w_user(u)

    def item_side(self, i: torch.Tensor) -> torch.Tensor:  # (I, D) -> (I, H): item-only, once per item
        return self.w_item(i)

    def pair_side(
        self, u: torch.Tensor, u_pre: torch.Tensor, i: torch.Tensor, i_pre: torch.Tensor | None = None
    ) -> torch.Tensor:
        # u, i: (R, D) rows; u_pre: (R, H) broadcast user_side output; i_pre: (R, H) broadcast
        # item_side output, computed here when not given -> (R,) scores
        i_pre = self.item_side(i) if i_pre is None else i_pre
        h = F.relu(u_pre + i_pre + self.w_cross(u * i))
        return (u * i).sum(1) * self.inv_temperature + self.v(h).squeeze(1)

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """Per-row reference path: user-side work repeated for every row."""
        return self.pair_side(u, self.user_side(u), i)


class TwoTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: ModelConfig):
        super().__init__()
        self.schema, self.cfg = schema, cfg
        self.item_tower = ItemTower(schema, cfg)
        self.user_tower = UserTower(schema, cfg)
        self.scorer = RankingScorer(cfg)


@torch.inference_mode()
def item_vectors(
    tower: ItemTower, table: pa.Table, schema: FeatureSchema, batch_size: int = 8192
) -> np.ndarray:
    """Encoded catalog rows (features.ITEM_FEATURE_COLUMNS) -> (N, D) float32 vectors with the eager
    tower, in batches (training's evaluation; the reference the exported tower is checked against)."""
    d = tower.mlp[-1].out_features
    out = [
        tower(item_inputs_from_arrow(table.slice(s, batch_size), schema)).numpy()
        for s in range(0, table.num_rows, batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)


@torch.inference_mode()
def user_vectors(
    tower: UserTower,
    user_ids: np.ndarray,
    histories: list[np.ndarray] | pa.Array | pa.ChunkedArray,
    schema: FeatureSchema,
    batch_size: int = 8192,
) -> np.ndarray:
    """User ids + histories (item ids, most recent last) -> (U, D) float32 vectors with the eager tower."""
    d = tower.mlp[-1].out_features
    if isinstance(histories, pa.ChunkedArray):
        histories = histories.combine_chunks()
    out = []
    for s in range(0, len(user_ids), batch_size):
        h = histories[s : s + batch_size]
        out.append(tower(user_inputs_from_lists(np.asarray(user_ids[s : s + batch_size]), h, schema)).numpy())
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)

"""Embedding catalog and user batches with ONE verified checkpoint.

Every output row carries the checkpoint version it was embedded with; the rebuild refuses to publish
unless all rows carry the same one. The Ray Data callable classes in jobs/ are one-line shells over
these functions.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from core.checkpoint import Checkpoint, load_checkpoint
from core.features import ITEM_FEATURE_COLUMNS, USER_FEATURE_COLUMNS, FeatureSchema, check_columns
from core.model import ItemTower, UserTower, item_inputs_from_arrow, user_inputs_from_lists


def embedding_table(ids: np.ndarray, emb: np.ndarray, version: str, id_name: str) -> pa.Table:
    """(ids, (N, D) float32) -> item_id/user_id, embedding fixed_size_list<float32>[D], checkpoint_version.
    The version is dictionary-encoded: one string per build, not per row."""
    n, d = emb.shape
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(emb, np.float32).reshape(-1)), d)
    version_col = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([version]))
    return pa.table({id_name: pa.array(ids, pa.int64()), "embedding": vec, "checkpoint_version": version_col})


def embeddings_to_numpy(table: pa.Table) -> np.ndarray:
    """embedding column -> (N, D) float32, contiguous."""
    col = table.column("embedding").combine_chunks()
    d = col.type.list_size
    return np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d), dtype=np.float32)


@torch.inference_mode()
def item_vectors(
    tower: ItemTower, table: pa.Table, schema: FeatureSchema, batch_size: int = 8192
) -> np.ndarray:
    """Encoded catalog rows (ITEM_FEATURE_COLUMNS) -> (N, D) float32 vectors, in batches. The one place
    items are embedded outside the rebuild's pipeline (training, evaluation, the serving sidecar)."""
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
    """User ids + histories (item ids, most recent last) -> (U, D) float32 vectors, in batches."""
    d = tower.mlp[-1].out_features
    if isinstance(histories, pa.ChunkedArray):
        histories = histories.combine_chunks()
    out = []
    for s in range(0, len(user_ids), batch_size):
        h = histories[s : s + batch_size]
        out.append(tower(user_inputs_from_lists(np.asarray(user_ids[s : s + batch_size]), h, schema)).numpy())
    return np.concatenate(out) if out else np.zeros((0, d), np.float32)


PRECISIONS = ("fp32", "bf16")


class Embedder:
    """Holds one checkpoint on one device and embeds Arrow batches of items or users."""

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        expected_schema: FeatureSchema | None = None,
        precision: str = "fp32",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        if threads:
            torch.set_num_threads(threads)
        self.ckpt: Checkpoint = load_checkpoint(Path(checkpoint), expected_schema=expected_schema)
        self.device = torch.device(device)
        self.model = self.ckpt.model.to(self.device)

    def _compute(self):
        # bf16 autocast: 2x the fp32 GEMM rate on CPUs with bf16 units, output vectors still float32;
        # the vectors differ from fp32 ones (benchmarks/embed_roof.py measures the retrieval cost)
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def items(self, batch: pa.Table) -> pa.Table:
        check_columns(batch.column_names, ITEM_FEATURE_COLUMNS, "catalog batch")
        x = item_inputs_from_arrow(batch, self.ckpt.schema).to(self.device)
        with self._compute():
            emb = self.model.item_tower(x).float().cpu().numpy()  # (N, D)
        return embedding_table(batch.column("item_id").to_numpy(), emb, self.ckpt.version, "item_id")

    @torch.inference_mode()
    def users(self, batch: pa.Table) -> pa.Table:
        check_columns(batch.column_names, USER_FEATURE_COLUMNS, "users batch")
        ids = batch.column("user_id").to_numpy()
        x = user_inputs_from_lists(ids, batch.column("history"), self.ckpt.schema).to(self.device)
        with self._compute():
            emb = self.model.user_tower(x).float().cpu().numpy()  # (U, D)
        return embedding_table(ids, emb, self.ckpt.version, "user_id")

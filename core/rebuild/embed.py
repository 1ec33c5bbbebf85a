"""Embedding catalog and user batches with ONE verified model package.

Every output row carries the package version it was embedded with; the rebuild refuses to publish
unless all rows carry the same one. The rebuild's workers are thin shells over `Embedder`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from core.contract.towers import PRECISIONS, ModelPackage, load_package
from core.rebuild.validate import embeddings_to_numpy

__all__ = ["PRECISIONS", "Embedder", "embedding_table", "embeddings_to_numpy"]


def embedding_table(ids: np.ndarray, emb: np.ndarray, version: str, id_name: str) -> pa.Table:
    """(ids, (N, D) float32) -> item_id/user_id, embedding fixed_size_list<float32>[D], checkpoint_version.
    The version is dictionary-encoded: one string per build, not per row."""
    n, d = emb.shape
    vec = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(emb, np.float32).reshape(-1)), d)
    version_col = pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([version]))
    return pa.table({id_name: pa.array(ids, pa.int64()), "embedding": vec, "checkpoint_version": version_col})


class Embedder:
    """Holds one model package on one device and embeds Arrow batches of items or users (the id column
    plus the tower's declared columns, validated against the package before the tower runs)."""

    def __init__(
        self, package: str | Path, device: str = "cpu", threads: int | None = None, precision: str = "fp32"
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        if threads:
            torch.set_num_threads(threads)
        self.model: ModelPackage = load_package(package)
        self.device = torch.device(device)
        for program in self.model.programs.values():
            program.to(self.device)

    @property
    def version(self) -> str:
        return self.model.version

    def _compute(self):
        # bf16 autocast: 2x the fp32 GEMM rate on CPUs with bf16 units, output vectors still float32;
        # the vectors differ from fp32 ones (benchmarks/embed_roof.py measures the retrieval cost)
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _embed(self, tower: str, batch: pa.Table, id_name: str, what: str) -> pa.Table:
        if id_name not in batch.column_names:
            raise ValueError(f"{what} has no id column {id_name!r}; it has {batch.column_names}")
        emb = self.model.vectors(tower, batch, what, batch_size=max(1, batch.num_rows), device=self.device,
                                 compute=self._compute)  # fmt: skip
        return embedding_table(batch.column(id_name).to_numpy(), emb, self.model.version, id_name)

    def items(self, batch: pa.Table) -> pa.Table:
        return self._embed("item", batch, self.model.manifest.item_id, "catalog batch")

    def users(self, batch: pa.Table) -> pa.Table:
        return self._embed("user", batch, self.model.manifest.user_id, "users batch")

    def columns(self, what: str) -> list[str]:
        """What a partition must be read with: the id column and the tower's declared inputs."""
        m = self.model.manifest
        tower, id_name = ("item", m.item_id) if what == "items" else ("user", m.user_id)
        return list(dict.fromkeys([id_name, *(s.name for s in self.model.inputs(tower))]))

"""A model package whose item tower is deliberately heavy (a deep, wide MLP: ~0.5 ms of one core per
item), and a catalog for it: a rebuild whose embedding lasts long enough (tens of seconds on 2 cores)
for the fault tests to kill an actor or remove a node while parts are being written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from core.contract.package import write_package
from core.contract.spec import InputSpec
from core.storage.datasets import split_table, write_dataset

DIM, WIDTH, DEPTH, BUCKETS = 32, 1024, 6, 1000
ANY_ID = 1 << 62


class Tower(nn.Module):
    def __init__(self, depth: int):
        super().__init__()
        self.emb = nn.Embedding(BUCKETS, WIDTH)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(WIDTH, DIM))

    def forward(self, x):
        return nn.functional.normalize(self.mlp(self.emb(x % BUCKETS)), dim=1)


class ItemProgram(Tower):
    def forward(self, item_id):
        return super().forward(item_id)


class UserProgram(Tower):
    def forward(self, user_id):
        return super().forward(user_id)


def package(root: Path) -> Path:
    torch.manual_seed(0)
    return write_package(
        root,
        family="heavy",
        item_tower=ItemProgram(DEPTH).eval(),
        user_tower=UserProgram(1).eval(),
        item_inputs=[InputSpec("item_id", "int64", vocab=ANY_ID)],
        user_inputs=[InputSpec("user_id", "int64", vocab=ANY_ID)],
        similarity="cosine",
    )


def catalog(root: Path, items: int, partitions: int) -> Path:
    ids = np.arange(1, items + 1, dtype=np.int64)
    write_dataset(
        root, split_table(pa.table({"item_id": ids}), partitions), kind="catalog", source={"heavy": True}
    )
    return root

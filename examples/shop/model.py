"""The shop model: towers, its declared inputs, a seeded synthetic catalog and user table, and packaging.

python -m examples.shop.model --out packages --data data/shop [--items 5000] [--users 300] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from core.contract.package import write_package
from core.contract.spec import InputSpec
from core.storage.datasets import split_table, write_dataset

DIM, CATEGORIES, VOCAB, DENSE, SEGMENTS = 16, 40, 1000, 8, 12
ITEM_INPUTS = [
    InputSpec("category", "int64", vocab=CATEGORIES),
    InputSpec("price", "float32"),
    InputSpec("dense", "float32", "fixed", length=DENSE),
    InputSpec("tokens", "int64", "ragged", max_len=12, vocab=VOCAB),
]
USER_INPUTS = [
    InputSpec("segment", "int64", vocab=SEGMENTS),
    InputSpec("spend", "float32"),
    InputSpec("interests", "float32", "fixed", length=DENSE),
    InputSpec("searches", "int64", "ragged", max_len=8, vocab=VOCAB),
]


class ItemTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.category = nn.Embedding(CATEGORIES, 8)
        self.tokens = nn.EmbeddingBag(VOCAB, 8, mode="sum")
        self.mlp = nn.Sequential(nn.Linear(8 + 1 + DENSE + 8, 32), nn.Tanh(), nn.Linear(32, DIM))

    def forward(self, category, price, dense, tokens, tokens_offsets):
        h = torch.cat([self.category(category), torch.log1p(price).unsqueeze(1), dense,
                       self.tokens(tokens, tokens_offsets)], dim=1)  # fmt: skip
        return self.mlp(h)  # (N, DIM); inner product, not unit norm


class UserTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.segment = nn.Embedding(SEGMENTS, 8)
        self.searches = nn.EmbeddingBag(VOCAB, 8, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(8 + 1 + DENSE + 8, 32), nn.Tanh(), nn.Linear(32, DIM))

    def forward(self, segment, spend, interests, searches, searches_offsets):
        h = torch.cat([self.segment(segment), spend.unsqueeze(1), interests,
                       self.searches(searches, searches_offsets)], dim=1)  # fmt: skip
        return self.mlp(h)


class Scorer(nn.Module):
    """score = <u, i> + w . tanh(A [u; i]): one per-row program (no user-only split)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2 * DIM, 16)
        self.w = nn.Linear(16, 1, bias=False)

    def forward(self, user, item):
        return (user * item).sum(1) + self.w(torch.tanh(self.a(torch.cat([user, item], 1)))).squeeze(1)


def towers(seed: int = 0, perturb: float = 0.0) -> tuple[ItemTower, UserTower, Scorer]:
    """Seeded towers; `perturb` > 0 adds that much seeded noise to every weight: a "next version" close
    to the seed's model (what a warm-started retraining gives)."""
    torch.manual_seed(seed)
    modules = ItemTower().eval(), UserTower().eval(), Scorer().eval()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for m in modules:
                for p in m.parameters():
                    p.add_(perturb * torch.randn(p.shape, generator=g))
    return modules


def package(root: Path, seed: int = 0, perturb: float = 0.0) -> Path:
    item, user, scorer = towers(seed, perturb)
    return write_package(root, family="shop", item_tower=item, user_tower=user, item_inputs=ITEM_INPUTS,
                         user_inputs=USER_INPUTS, similarity="inner_product", scorer=scorer,
                         metadata={"example": "examples.shop", "seed": seed, "perturb": perturb})  # fmt: skip


def _ragged(rng: np.random.Generator, n: int, max_len: int) -> pa.ListArray:
    lens = rng.integers(0, max_len + 1, size=n)
    offs = np.zeros(n + 1, np.int32)
    np.cumsum(lens, out=offs[1:])
    return pa.ListArray.from_arrays(
        pa.array(offs), pa.array(rng.integers(0, VOCAB, int(offs[-1])), pa.int64())
    )


def _dense(rng: np.random.Generator, n: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(rng.standard_normal(n * DENSE).astype(np.float32)), DENSE
    )


def catalog(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"item_id": pa.array(rng.permutation(n * 3)[:n] + 1000, pa.int64()),
                     "category": pa.array(rng.integers(0, CATEGORIES, n), pa.int64()),
                     "price": pa.array(rng.gamma(2.0, 20.0, n).astype(np.float32)),
                     "dense": _dense(rng, n), "tokens": _ragged(rng, n, 12)})  # fmt: skip


def users(n: int, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"user_id": pa.array(np.arange(n, dtype=np.int64) * 7 + 5),
                     "segment": pa.array(rng.integers(0, SEGMENTS, n), pa.int64()),
                     "spend": pa.array(rng.random(n).astype(np.float32)),
                     "interests": _dense(rng, n), "searches": _ragged(rng, n, 8)})  # fmt: skip


def planted_holdout(package_dir: Path, cat: pa.Table, usr: pa.Table, per_user: int = 3) -> pa.Table:
    """Held-out interactions the model in `package_dir` ranks first: each user's top `per_user` items
    by its towers. A stand-in for real data that makes this untrained model "good" on it, so the
    quality floor, the skew check and the comparison gate have something to measure."""
    from core.contract.towers import load_package

    m = load_package(package_dir)
    scores = m.user_vectors(usr) @ m.item_vectors(cat).T  # (U, N)
    top = np.argsort(-scores, axis=1)[:, :per_user]
    return pa.table({"user_id": np.repeat(usr["user_id"].to_numpy(), per_user),
                     "item_id": cat["item_id"].to_numpy()[top.reshape(-1)]})  # fmt: skip


def write_data(out: Path, items: int, n_users: int, parts: int = 4, holdout_from: Path | None = None) -> None:
    """catalog/ and users/ datasets, and with `holdout_from` (a package) interactions/test/."""
    cat, usr = catalog(items), users(n_users)
    tables = [("catalog", cat), ("users", usr)]
    if holdout_from is not None:
        tables.append(("interactions/test", planted_holdout(holdout_from, cat, usr)))
    for kind, table in tables:
        write_dataset(out / kind, split_table(table, parts), kind=kind.split("/")[0],
                      source={"example": "examples.shop"}, overwrite=True)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m examples.shop.model", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("packages"), help="where the package is written")
    p.add_argument("--data", type=Path, help="also write a synthetic catalog and users dataset here")
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--users", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb", type=float, default=0.0, help="noise on every weight: a nearby next version")
    a = p.parse_args(argv)
    pkg = package(a.out, a.seed, a.perturb)
    print(pkg)
    if a.data:
        write_data(a.data, a.items, a.users, holdout_from=pkg)


if __name__ == "__main__":
    main()

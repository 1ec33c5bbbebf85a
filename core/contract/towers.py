"""A loaded, verified model package: the towers and scorer every job and endpoint runs.

`load_package` refuses a package whose files, hashes, graphs or outputs do not match its manifest,
naming what was declared and what was found. The loaded object embeds Arrow tables of items or users
(validated against the declared inputs first) and scores (user, item) embedding rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from core.contract import encode
from core.contract import package as pkg
from core.contract.examples import example_arrays
from core.contract.spec import ContractError, InputSpec
from core.storage.remote_trees import fetch_tree
from core.storage.store import is_remote

PRECISIONS = ("fp32", "bf16")


@dataclasses.dataclass(frozen=True)
class ModelPackage:
    path: Path
    manifest: pkg.PackageManifest
    programs: dict[str, Callable[..., torch.Tensor]]

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def family(self) -> str:
        return self.manifest.family

    @property
    def dim(self) -> int:
        return self.manifest.embed_dim

    @property
    def content_sha256(self) -> str:
        return self.manifest.content_sha256

    def inputs(self, tower: str) -> tuple[InputSpec, ...]:
        return self.manifest.towers[tower].inputs

    @property
    def item_inputs(self) -> tuple[InputSpec, ...]:
        return self.inputs("item")

    @property
    def user_inputs(self) -> tuple[InputSpec, ...]:
        return self.inputs("user")

    @property
    def has_user_side(self) -> bool:
        """A scorer split into a user-only part (run once per unique user) and a pair part."""
        return "scorer_user" in self.programs

    def call(self, role: str, **tensors: torch.Tensor) -> torch.Tensor:
        """One program on keyword tensors (already validated): its one output. `forward` directly: the
        loaded programs carry no hooks, and nn.Module's call path costs ~10 us per small batch."""
        return self.programs[role].forward(**tensors)[0]

    # ------------------------------------------------------------------------------- embedding

    @torch.inference_mode()
    def run(
        self, tower: str, arrays: dict[str, np.ndarray], device: torch.device | str = "cpu"
    ) -> np.ndarray:
        """Already-validated keyword arrays -> (N, D) float32."""
        out = self.call(tower, **encode.to_tensors(arrays, device))
        return out.float().cpu().numpy()

    def vectors(
        self,
        tower: str,
        table: pa.Table,
        what: str,
        batch_size: int = 8192,
        device: str = "cpu",
        compute=None,
    ) -> np.ndarray:
        """Rows of a table (the tower's declared columns, validated) -> (N, D) float32 vectors.
        `compute`: a context-manager factory around each batch (e.g. bf16 autocast)."""
        specs = self.inputs(tower)
        encode.check_columns(table.column_names, specs, what)
        out = []
        for s in range(0, table.num_rows, batch_size):
            arrays = encode.table_arrays(table.slice(s, batch_size), specs, what)
            with compute() if compute else contextlib.nullcontext():
                out.append(self.run(tower, arrays, device))
        if len(out) == 1:  # one batch (every serving call): no copy
            return out[0]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def item_vectors(self, table: pa.Table, batch_size: int = 8192) -> np.ndarray:
        return self.vectors("item", table, "catalog rows", batch_size)

    def user_vectors(self, table: pa.Table, batch_size: int = 8192) -> np.ndarray:
        return self.vectors("user", table, "user rows", batch_size)

    # ------------------------------------------------------------------------------- scoring

    @torch.inference_mode()
    def user_side(self, u: torch.Tensor) -> torch.Tensor:
        """(U, D) -> (U, H): the scorer's user-only part, once per unique user."""
        return self.call("scorer_user", user=u)

    @torch.inference_mode()
    def pair_scores(self, u: torch.Tensor, u_side: torch.Tensor | None, i: torch.Tensor) -> torch.Tensor:
        """(R, D) user rows, their (R, H) broadcast user side (split scorers), (R, D) items -> (R,)."""
        if "scorer_pair" in self.programs:
            return self.call("scorer_pair", user=u, user_side=u_side, item=i)
        if "scorer" in self.programs:
            return self.call("scorer", user=u, item=i)
        return (u * i).sum(1)  # the towers' similarity: inner product (cosine on unit vectors)

    @torch.inference_mode()
    def scores(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """The per-row reference: user-side work repeated for every row."""
        return self.pair_scores(u, self.user_side(u) if self.has_user_side else None, i)


def _trial(m: ModelPackage) -> None:
    """A two-row batch through every program: outputs of the declared shape, finite."""
    for role in ("item", "user"):
        out = m.run(role, example_arrays(m.inputs(role), rows=2))
        if out.shape != (2, m.dim) or not np.isfinite(out).all():
            raise ContractError(f"{m.path}: {role} tower gives {out.shape} (finite: {np.isfinite(out).all()}) "
                                f"for 2 rows; the manifest declares (2, {m.dim})")  # fmt: skip
    u = torch.zeros(2, m.dim)
    s = m.scores(u, u)
    if tuple(s.shape) != (2,):
        raise ContractError(f"{m.path}: the scorer gives {tuple(s.shape)} for 2 rows, expected (2,)")


def load_package(path: str | Path) -> ModelPackage:
    """Load and verify every file against the manifest; nothing in the package is executed as code.
    `path`: a directory, or an s3:// / gs:// URL (this node's cached copy of it is what is verified)."""
    if is_remote(str(path)):
        path = fetch_tree(str(path), pkg.MANIFEST, "packages")
    path = Path(path)
    if not path.is_dir():
        raise ContractError(f"model package directory {path} does not exist")
    m = pkg.read_manifest(path)
    pkg.verify_version(path, m)
    try:
        programs = {role: pkg.load_program(path, role, rec) for role, rec in m.towers.items()}
    except (OSError, RuntimeError, KeyError) as e:
        raise ContractError(f"{path}: a program cannot be loaded: {type(e).__name__}: {e}") from e
    loaded = ModelPackage(path, m, programs)
    _trial(loaded)
    return loaded

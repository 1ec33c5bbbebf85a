"""Seeded, valid inputs for a tower's declared inputs: what export traces with and what a trial batch
runs. Each row holds two values of every ragged input: torch.export specializes a dimension it sees
with size 0 or 1 to a constant."""

from __future__ import annotations

import numpy as np

from core.contract.spec import OFFSETS_SUFFIX, InputSpec


def _values(spec: InputSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if spec.dtype == "int64":
        return rng.integers(0, min(spec.vocab, 1 << 20), size=n, dtype=np.int64)
    return rng.standard_normal(n).astype(np.float32)


def example_arrays(inputs: tuple[InputSpec, ...], rows: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """{argument name: array} for `rows` rows; ragged rows hold min(2, max_len) values each."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for s in inputs:
        if s.shape == "scalar":
            out[s.name] = _values(s, rows, rng)
        elif s.shape == "fixed":
            out[s.name] = _values(s, rows * s.length, rng).reshape(rows, s.length)
        else:
            per_row = min(2, s.max_len)
            out[s.name] = _values(s, rows * per_row, rng)
            out[s.name + OFFSETS_SUFFIX] = np.arange(rows, dtype=np.int64) * per_row
    return out

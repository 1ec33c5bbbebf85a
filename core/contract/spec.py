"""What a model package declares: each tower's inputs (column, dtype, shape, value range) and outputs.

The declaration is the contract between the user's model and every part of skewless: catalog columns,
user features in a request and sidecar items are validated and cast against it (core.contract.encode)
before a tower sees them, because an exported program checks none of dtype, range or finiteness.

A tower is called with keyword tensors, one per declared input; a ragged input `x` is passed as two:
`x` (all values, flat) and `x_offsets` (N,) int64, where row r's values start (EmbeddingBag's layout).
"""

from __future__ import annotations

import dataclasses

DTYPES = ("int64", "float32")
SHAPES = ("scalar", "fixed", "ragged")
SIMILARITIES = ("cosine", "inner_product")
# Tower roles: the two towers are required; a scorer is either one per-row program (`scorer`) or its
# user-only part and pair part (`scorer_user`, `scorer_pair`), which lets broadcast run the user part once
# per unique user. Without a scorer, /score is the towers' similarity.
TOWERS = ("item", "user")
SCORERS = ("scorer", "scorer_user", "scorer_pair")
OFFSETS_SUFFIX = "_offsets"


class ContractError(ValueError):
    """Data or a package does not match the declared contract; the message names the column or tower,
    what was declared and what was found."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One declared input column of a tower.

    int64 columns declare `vocab`: every value must be in [0, vocab) (an id past an embedding table
    raises deep inside the program otherwise). float32 columns must be finite. `length` is the row
    length of a fixed input, `max_len` the longest list a ragged input may hold."""

    name: str
    dtype: str
    shape: str = "scalar"
    length: int | None = None
    max_len: int | None = None
    vocab: int | None = None

    def __post_init__(self):
        where = f"input {self.name!r}"
        if not self.name.isidentifier() or self.name.endswith(OFFSETS_SUFFIX):
            raise ContractError(
                f"{where}: a name must be a Python identifier not ending in {OFFSETS_SUFFIX!r}"
            )
        if self.dtype not in DTYPES:
            raise ContractError(f"{where}: dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.shape not in SHAPES:
            raise ContractError(f"{where}: shape must be one of {SHAPES}, got {self.shape!r}")
        if (self.shape == "fixed") != (self.length is not None) or (
            self.length is not None and self.length < 1
        ):
            raise ContractError(
                f"{where}: a fixed input needs length >= 1 (and only it), got {self.length!r}"
            )
        if (self.shape == "ragged") != (self.max_len is not None) or (
            self.max_len is not None and self.max_len < 1
        ):
            raise ContractError(
                f"{where}: a ragged input needs max_len >= 1 (and only it), got {self.max_len!r}"
            )
        if (self.dtype == "int64") != (self.vocab is not None) or (self.vocab is not None and self.vocab < 1):
            raise ContractError(f"{where}: an int64 input needs vocab >= 1 (and only it), got {self.vocab!r}")

    @property
    def arg_names(self) -> tuple[str, ...]:
        """The tower's keyword arguments this input becomes."""
        return (self.name, self.name + OFFSETS_SUFFIX) if self.shape == "ragged" else (self.name,)

    def describe(self) -> str:
        """For error messages: e.g. 'ragged int64 list (max 50 values) in [0, 65536)'."""
        kind = {"scalar": f"{self.dtype} scalar", "fixed": f"{self.dtype}[{self.length}]",
                "ragged": f"list of {self.dtype} (at most {self.max_len})"}[self.shape]  # fmt: skip
        return kind + (f" in [0, {self.vocab})" if self.vocab is not None else ", finite")

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ContractError(f"input {d.get('name')!r}: unknown keys {sorted(unknown)}")
        return cls(**d)


def embedding_input(name: str, dim: int) -> InputSpec:
    """A (N, dim) float32 input: what the scorer programs take (tower outputs)."""
    return InputSpec(name, "float32", "fixed", length=dim)


def check_unique(inputs: tuple[InputSpec, ...], where: str) -> None:
    args = [a for s in inputs for a in s.arg_names]
    dup = sorted({a for a in args if args.count(a) > 1})
    if dup:
        raise ContractError(f"{where}: argument names {dup} are declared more than once")

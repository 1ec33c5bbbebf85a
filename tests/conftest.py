import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MOVIELENS = Path(os.environ.get("SKEWLESS_MOVIELENS", REPO.parent / "shared/data/movielens/ml-latest-small"))


@pytest.fixture(scope="session")
def movielens_dir() -> Path:
    if not (MOVIELENS / "ratings.csv").is_file():
        pytest.fail(f"MovieLens not found at {MOVIELENS}; set SKEWLESS_MOVIELENS")
    return MOVIELENS

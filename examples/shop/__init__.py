"""A second model of the contract, unlike MovieLens on every side: items with a categorical id, a float
price, a fixed-length dense vector and a ragged token list; users described by features (a segment, a
spend level, an interest vector, recent search tokens), not by a history of items; inner-product
similarity and a one-piece per-row scorer. skewless never sees this code: only its package."""

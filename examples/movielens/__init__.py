"""The MovieLens two-tower model: an example model package, not part of skewless itself.

features.py    its feature schema and encoding (raw catalog columns -> integer features)
data.py        locating and loading ml-latest-small (catalog, users, time-split interactions)
synthetic.py   synthetic catalogs and users in the same schema, at any size (benchmarks, tests)
model.py       the eager towers and ranking scorer
training.py    the training loop and held-out evaluation
checkpoint.py  training checkpoints (state_dict + manifest)
export.py      a checkpoint -> a model package (core.contract), what every job consumes

python -m examples.movielens.prepare movielens        # -> data/movielens
python -m examples.movielens.train --seed 0           # -> checkpoints/<v>, packages/<family>-<hash>
"""

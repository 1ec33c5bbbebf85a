"""The MovieLens two-tower model: its features, data preparation, training and export to a package."""

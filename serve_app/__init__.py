"""Thin Ray Serve adapters over core/: the scoring/retrieval application and its config."""

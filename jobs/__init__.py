"""Thin entrypoints: each `python -m jobs.NAME` parses flags into a frozen config and calls core/."""

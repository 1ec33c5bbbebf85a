"""Where artifacts live and how they are written: crash-safe files, datasets, build directories, the registry's pointer, the sidecar log."""

"""The Ray-free half of an index rebuild: preflight, embedding partitions with one package, gates, assembling and publishing the index."""

"""Is a build fit to serve: the comparison gate and quality floor, and the version-skew check."""

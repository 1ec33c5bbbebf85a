"""Models that use skewless only through its public model contract (core.contract)."""

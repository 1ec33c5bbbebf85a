"""skewless core: plain Python, torch, numpy, faiss and pyarrow. Never imports Ray."""

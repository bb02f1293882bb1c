"""Data: datasets as lists of ``(path, pid, camid)`` records, the synthetic dataset, image reading,
transforms, the PK sampler and image loaders (the last three need torch)."""

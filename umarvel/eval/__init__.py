"""umarvel.eval: M-BEIR and zero-shot evaluation (readers live in umarvel.data), the embedding cache and search.

Kept free of heavy imports: the CLI's flag tables read the defaults below without loading torch.
"""

#: Items per embedding-cache shard: the resume granularity and the unit of rank sharding.
DEFAULT_SHARD_SIZE = 16384

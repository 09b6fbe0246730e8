"""Pipelines: code that drives encode -> search -> score -> write over whole datasets.

Mining hard negatives (:mod:`.mining`), the reranker's teacher scores for distillation (:mod:`.teacher`)
and U-MARVEL+ recall-then-rerank evaluation (:mod:`.plus`). This layer sits above ``train``, ``rerank``
and ``eval`` and may use all three; none of them imports it.
"""

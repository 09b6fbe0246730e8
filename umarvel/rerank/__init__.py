"""umarvel.rerank: the point-wise U-MARVEL reranker (method spec section 4; decisions D9, D10).

Modules: ``prompts`` (the exact official prompt), ``collate`` (tokenization, right-padded training batches
with assistant-turn labels, left-padded scoring batches), ``model`` (load / LoRA / loss / one-forward
P(yes)), ``score`` (batched scoring of retrieval runs), ``data`` (training pairs from mined lists),
``train`` (config + the task the one trainer runs), ``fusion`` (cos + w * P(yes), validation-only weight choice,
stage-5 teacher weights). CLI: ``umarvel rerank train|score|fuse`` (``umarvel.commands.rerank``).
"""

"""Search one's own collection: build, grow and search an index folder (``from umarvel import Index``).

    from umarvel import Index, UMarvel
    model = UMarvel.from_pretrained("checkpoints/umarvel")
    index = Index.build(model, "photos/", "photos.idx")           # or Index.load("photos.idx")
    index.add(model, "more.jsonl")
    hits = index.query(model, {"text": "a dog on a beach"}, k=10)[0]   # encode + search
    hits = index.search(query_vectors, k=10)                       # vectors you computed: one list per query

See :mod:`umarvel.index.core` (folder layout, backends), :mod:`umarvel.index.items` (inputs),
:mod:`umarvel.index.html` (result pages) and :mod:`umarvel.index.server` (``umarvel serve``).
"""
from umarvel.index.core import BACKENDS, Hit, Index
from umarvel.index.items import read_items

__all__ = ["Index", "Hit", "BACKENDS", "read_items"]

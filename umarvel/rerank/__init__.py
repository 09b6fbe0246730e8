"""umarvel.rerank."""

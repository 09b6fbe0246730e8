"""umarvel.model."""

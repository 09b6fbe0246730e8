"""umarvel.train."""

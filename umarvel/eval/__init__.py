"""umarvel.eval."""

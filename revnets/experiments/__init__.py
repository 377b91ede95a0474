"""Command-line interface and reproductions of the papers' experiments."""

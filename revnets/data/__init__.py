"""Datasets: generated ones for now (the papers' toy problems)."""

from .synthetic import nested_rings as nested_rings

"""Find a recipe under one budget: the families' measured frontiers, compositions in a fixed order, the
measured Pareto front, the chosen point verified on samples the search never read (see engine.py)."""

from .engine import DEFAULT_MAX_MINUTES, Point, Search, SearchResult, pareto, search, searchable, verify_choice
from .objective import Budget, Fidelity

__all__ = ["Budget", "Fidelity", "Point", "Search", "SearchResult", "pareto", "search", "searchable",
           "verify_choice", "DEFAULT_MAX_MINUTES"]

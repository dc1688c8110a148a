"""Built-in attribution methods; importing the package registers them."""

from methods import baseline, bm25, gradient  # noqa: F401

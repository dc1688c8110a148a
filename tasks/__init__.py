"""Built-in tasks; importing the package registers them."""

from tasks import facts  # noqa: F401

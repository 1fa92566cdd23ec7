"""Model families. Importing this package registers every built-in builder."""

from cifarx.models import simple_cnn  # noqa: F401

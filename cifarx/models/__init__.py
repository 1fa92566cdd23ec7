"""Model families. Importing this package registers every built-in builder."""

from cifarx.models import fast, simple_cnn  # noqa: F401
from cifarx.models import vae  # noqa: F401
from cifarx.models import blocknet  # noqa: F401
from cifarx.models import vgg  # noqa: F401
from cifarx.models import shake_shake  # noqa: F401
from cifarx.models import ensemble  # noqa: F401

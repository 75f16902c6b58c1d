"""The old import path of :mod:`embedlink.testing.sim`, which moved there with the
layered layout (docs/architecture.md): importing this name gives that very
module (``sys.modules`` maps both names to one module object)."""

import sys

from .testing import sim as _moved
from .testing.sim import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved

"""The old import path of :mod:`embedlink._runtime.auth`, which moved there with the
layered layout (docs/architecture.md): importing this name gives that very
module (``sys.modules`` maps both names to one module object)."""

import sys

from ._runtime import auth as _moved
from ._runtime.auth import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved

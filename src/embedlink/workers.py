"""The old import path of :mod:`embedlink.tools.workers`, which moved there with the
layered layout (docs/architecture.md): importing this name gives that very
module (``sys.modules`` maps both names to one module object)."""

import sys

from .tools import workers as _moved
from .tools.workers import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved

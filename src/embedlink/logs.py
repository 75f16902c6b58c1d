"""The old import path of :mod:`embedlink.observability.logs`, which moved there with the
layered layout (docs/architecture.md): importing this name gives that very
module (``sys.modules`` maps both names to one module object)."""

import sys

from .observability import logs as _moved
from .observability.logs import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved

"""The old import path of :mod:`embedlink.service.standalone`, which moved there with the
layered layout (docs/architecture.md): importing this name gives that very
module (``sys.modules`` maps both names to one module object)."""

import sys

from .service import standalone as _moved
from .service.standalone import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved

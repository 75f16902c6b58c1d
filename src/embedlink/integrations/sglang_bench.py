"""The old import path of :mod:`embedlink.tools.sglang_bench`, which moved there with the
layered layout (docs/architecture.md): importing this name gives that very
module (``sys.modules`` maps both names to one module object)."""

import sys

from ..tools import sglang_bench as _moved
from ..tools.sglang_bench import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved

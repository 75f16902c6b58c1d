"""The old import path of :mod:`embedlink.integrations.vllm_proxy`, which moved there with the
layered layout (docs/architecture.md): importing this name gives that very
module (``sys.modules`` maps both names to one module object)."""

import sys

from .integrations import vllm_proxy as _moved
from .integrations.vllm_proxy import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved

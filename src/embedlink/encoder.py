"""The old import path of :mod:`embedlink.endpoints.encoder`, which moved there with the
layered layout (docs/architecture.md) and is now a package of parts behind
the :class:`EncoderEndpoint` facade: importing this name gives that very
package (``sys.modules`` maps both names to one module object), so
``from embedlink.encoder import EncoderEndpoint, Sender, EndpointStats``
still works."""

import sys

from .endpoints import encoder as _moved
from .endpoints.encoder import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved

"""The ``vllm.general_plugins`` entry point (kept apart from the connector:
vLLM loads every installed plugin in each of its processes, and this one must
cost nothing until the connector is used)."""

from __future__ import annotations

NAME = "EmbedlinkECConnector"
MODULE = "embedlink.integrations.vllm"


def register() -> None:
    """Make ``"ec_connector": "EmbedlinkECConnector"`` work without
    ``ec_connector_module_path``. vLLM loads plugins in every process, possibly
    more than once, and its factory raises on a second registration of a
    name: a second call is a no-op. The connector module is imported only
    when vLLM builds the connector (its version check runs then)."""
    from vllm.distributed.ec_transfer.ec_connector.factory import ECConnectorFactory

    if NAME not in ECConnectorFactory._registry:
        ECConnectorFactory.register_connector(NAME, MODULE, NAME)

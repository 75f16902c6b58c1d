"""Adapters that let serving engines use embedlink as their encoder-output
transfer: :mod:`embedlink.integrations.vllm` (vLLM's EC connector).

The engine-independent parts (what a scheduler process and a worker process
each do, and how they talk on one host) live in
:mod:`embedlink.integrations._plane`, importable without any engine.
"""

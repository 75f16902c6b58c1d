"""What operators run: the ``embedlink`` command (``cli``) and the standalone
encoder and language processes it starts (``standalone``)."""

"""The two endpoints: :mod:`.encoder` (``EncoderEndpoint``, ``Sender``) and
:mod:`.language` (``LanguageEndpoint``, ``Receiver``), the I/O shell around
the pure rooms of :mod:`embedlink.protocol`. Import them from ``embedlink``."""

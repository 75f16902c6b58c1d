import embedlink
import embedlink.protocol


def test_exported_members_are_pinned():
    assert sorted(embedlink.__all__) == sorted(
        [
            "PROTOCOL_VERSION",
            "BlockAllocator",
            "BootstrapClient",
            "BootstrapError",
            "BootstrapServer",
            "BufferPool",
            "BufferSchema",
            "EmbedlinkError",
            "Embedding",
            "EncoderEndpoint",
            "FieldSpec",
            "LanguageEndpoint",
            "LocalProtocolError",
            "Receiver",
            "RemoteProtocolError",
            "Sender",
            "Status",
            "TransferError",
            "__version__",
        ]
    )


def test_every_exported_name_exists():
    for mod in (embedlink, embedlink.protocol):
        for name in mod.__all__:
            assert hasattr(mod, name), f"{mod.__name__}.{name}"


def test_status_failed_value_is_four():
    assert embedlink.Status.Failed.value == 4

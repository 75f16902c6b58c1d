import ml_dtypes
import numpy as np
import pytest

from embedlink import BufferSchema, FieldSpec
from embedlink.protocol import AUX_DTYPE, AUX_SIZE


def test_schema_defaults_match_qwen_vl():
    s = BufferSchema(hidden_size=3584, dtype="bfloat16")
    assert s.names == ("embedding", "token_ids", "mrope_positions")
    assert s.field("embedding").np_dtype == np.dtype(ml_dtypes.bfloat16)
    assert s.field("embedding").token_bytes == 3584 * 2
    assert s.field("token_ids").token_bytes == 4
    assert s.field("mrope_positions").shape == (3,)
    assert s.token_bytes == 3584 * 2 + 4 + 12


def test_schema_extra_fields_like_deepstack():
    s = BufferSchema(hidden_size=64, extra_fields={"deepstack": ((3, 64), "bfloat16")})
    assert s.names[-1] == "deepstack"
    assert s.field("deepstack").token_bytes == 3 * 64 * 2


def test_schema_describe_roundtrip_and_equality():
    s = BufferSchema(hidden_size=128, dtype="float16")
    assert BufferSchema.from_description(s.describe()) == s
    assert s != BufferSchema(hidden_size=128)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"dtype": "bfloat17"}, "unknown dtype"),
        ({"extra_fields": {"embedding": ((1,), "int8")}}, "duplicate"),
        ({"extra_fields": {"bad name": ((1,), "int8")}}, "identifier"),
        ({"extra_fields": {"x": ((0,), "int8")}}, "shape"),
        ({"fields": []}, "at least one"),
    ],
)
def test_schema_rejects_bad_definitions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BufferSchema(**kwargs)


def test_schema_field_lookup_names_known_fields():
    with pytest.raises(KeyError, match="embedding"):
        BufferSchema(hidden_size=8).field("nope")


def test_aux_record_layout():
    assert AUX_SIZE == 32
    assert AUX_DTYPE.names == ("total_tokens", "mrope_position_delta", "checksum", "flags")


def test_fieldspec_reserved_names():
    with pytest.raises(ValueError):
        FieldSpec("__aux__", (), "int8")

import pytest

from mixprec import Precision
from mixprec.core.precision import ACCEPTED_NAMES, FP8_E4M3, FP16, FP32, INT8, INT16


@pytest.mark.parametrize(
    "text, name",
    [("Int16", "int16"), ("INT8", "int8"), ("int2", "int2"), ("fp16", "fp16"), ("BF16", "bf16"),
     ("fp8", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"), ("FP32", "fp32"), ("Float16", "fp16"), ("int32", "int32")],
    ids=lambda v: str(v),
)  # fmt: skip
def test_names_parse_case_insensitively(text, name):
    assert Precision.parse(text).name == name


@pytest.mark.parametrize("bad", ["int17", "int1", "fp4", "", "int 8", 8, None], ids=repr)
def test_bad_name_lists_accepted_names(bad):
    with pytest.raises(ValueError, match="accepted .*int16.*fp8_e5m2"):
        Precision.parse(bad)


def test_order_follows_information_kept():
    assert Precision.parse("int4") < INT8 < FP8_E4M3 < INT16 < FP16 < FP32
    assert max([INT8, FP32, INT16]) is FP32
    assert sorted(Precision.parse(n) for n in ("int16", "int8", "int4")) == [
        Precision.parse("int4"),
        INT8,
        INT16,
    ]


def test_accepted_names_cover_the_spec():
    for name in [f"int{b}" for b in range(2, 17)] + ["fp16", "bf16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp32"]:
        assert name in ACCEPTED_NAMES


@pytest.mark.parametrize(
    "bits, kind, name", [(8, "int", "int8"), (16, "float", "fp16"), (8, "float", "fp8_e4m3")]
)
def test_from_bitwidth(bits, kind, name):
    assert Precision.from_bitwidth(bits, kind).name == name

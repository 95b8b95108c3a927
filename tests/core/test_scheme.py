import pytest

from lowbit.core.scheme import Scheme, parse_scheme, preset_names
from lowbit.errors import SchemeError


@pytest.mark.parametrize(
    "text,fmt,gran,gs,sym,zero",
    [
        ("int4-g128", "int4", "group", 128, False, "int"),
        ("int4-g32-sym", "int4", "group", 32, True, None),
        ("int8", "int8", "channel", None, True, None),
        ("int3-g64", "int3", "group", 64, False, "int"),
        ("int2-g64", "int2", "group", 64, False, "int"),
        ("int8-tensor", "int8", "tensor", None, True, None),
        ("int4", "int4", "channel", None, False, "int"),
        ("uint8", "int8", "channel", None, False, "int"),
        ("fp8", "fp8_e4m3fn", "channel", None, True, None),
        ("fp8-e5m2", "fp8_e5m2", "channel", None, True, None),
        ("bf16", "bf16", "none", None, True, None),
        ("fp16", "fp16", "none", None, True, None),
        ("nf4-g64", "nf4", "group", 64, True, None),
        ("int4-g128-zf16", "int4", "group", 128, False, "float16"),
    ],
)
def test_parse(text, fmt, gran, gs, sym, zero):
    s = parse_scheme(text)
    assert (s.format, s.granularity, s.group_size, s.symmetric, s.zero_dtype) == (fmt, gran, gs, sym, zero)
    assert parse_scheme(s.name) == s
    assert Scheme.from_dict(s.to_dict()) == s
    assert s.to_dict()["version"] == 1


@pytest.mark.parametrize("bad", ["int5-g33x", "int7", "int4-g0", "bf16-g64", "int4-g64-g32", "", "q4"])
def test_unparseable_lists_valid_forms(bad):
    with pytest.raises(SchemeError, match="int4-g128"):
        parse_scheme(bad)


def test_frozen_and_validated():
    s = parse_scheme("int4-g128")
    with pytest.raises(AttributeError):
        s.group_size = 64  # type: ignore[misc]
    with pytest.raises(SchemeError, match="group_size"):
        Scheme("int4", granularity="group")
    with pytest.raises(SchemeError, match="version"):
        Scheme.from_dict({**s.to_dict(), "version": 99})
    with pytest.raises(SchemeError, match="unknown scheme field"):
        Scheme.from_dict({**s.to_dict(), "colour": "red"})


def test_presets_registered():
    names = preset_names()
    for n in ("int8", "int4-g128", "int3-g64", "fp8", "bf16", "nf4-g64"):
        assert n in names


def test_symmetric_only_formats_say_so():
    with pytest.raises(SchemeError, match="symmetric only"):
        parse_scheme("fp8-asym")

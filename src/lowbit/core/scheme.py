"""``Scheme``: a frozen, versioned description of how one tensor is quantized.

Scheme strings, parsed by :func:`parse_scheme` (presets are looked up first):

==================  ===========================================================================
``int8``            signed 8-bit, per output channel, symmetric, fp16 scales
``int4-g128``       4-bit groups of 128 along the input dim, asymmetric (4-bit zero-points), fp16 scales
``int4-g32-sym``    the same, symmetric (no zero-points)
``int4`` / ``int4-ch``  per output channel; ``int8-tensor``: one scale for the whole tensor
``fp8`` / ``fp8-e5m2``  fp8 e4m3fn / e5m2 with a float32 scale per channel
``bf16`` / ``fp16``  plain casts
``nf4-g64``         NormalFloat4 lookup grid, absmax scale per group of 64
``q4_k`` ``q6_k`` …  a llama.cpp GGML block type, stored exactly as GGUF stores it (``q8_0 q4_0 q4_1 q5_0
                    q5_1 q2_k q3_k q4_k q5_k q6_k iq4_nl iq4_xs``); granularity ``block``
==================  ===========================================================================

Modifiers: ``-sym`` / ``-asym``, ``-g<N>``, ``-ch``, ``-tensor``, ``-sf32`` / ``-sbf16`` (scale dtype),
``-zf16`` (float zero-points, as HQQ stores them). Integer widths: 2, 3, 4, 5, 6, 8.

>>> parse_scheme("int4-g128")
Scheme(format='int4', granularity='group', group_size=128, symmetric=False, ...)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lowbit.errors import SchemeError
from lowbit.primitives.ggml_types import GGML_SCHEMES, BlockFacts
from lowbit.primitives.numformats import FloatFormat, IntFormat, NumberFormat, get_format
from lowbit.primitives.quant import Grid, group_dims, resolve_format

SCHEME_VERSION = 1
GRANULARITIES = ("none", "tensor", "channel", "group", "block")
SCALE_DTYPES = ("float16", "bfloat16", "float32")
ZERO_DTYPES = ("int", "float16", "bfloat16", "float32")
VALID_FORMS = ("int8, int4-g128, int4-g32-sym, int3-g64, int2-g64, int8-tensor, fp8, fp8-e5m2, bf16, fp16, nf4-g64, "
               "q4_k, q6_k, q4_0 …")


@dataclass(frozen=True)
class Scheme:
    """How one tensor is quantized. ``Scheme.parse("int4-g128")`` or build one field by field."""

    format: str
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    scale_dtype: str = "float16"
    zero_dtype: str | None = None
    version: int = field(default=SCHEME_VERSION)

    def __post_init__(self) -> None:
        if self.version != SCHEME_VERSION:
            raise SchemeError(f"scheme version {self.version} is not supported (this lowbit reads {SCHEME_VERSION})")
        if self.format in GGML_SCHEMES or self.granularity == "block":
            self._check_block()
            return
        fmt = get_format(self.format)
        if self.granularity not in GRANULARITIES:
            raise SchemeError(f"granularity {self.granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if (self.granularity == "group") != (self.group_size is not None):
            raise SchemeError("group_size is required with granularity 'group' and only with it")
        if self.group_size is not None and self.group_size < 1:
            raise SchemeError(f"group size must be positive, got {self.group_size}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SchemeError(f"scale dtype {self.scale_dtype!r} is not one of {', '.join(SCALE_DTYPES)}")
        if self.zero_dtype is not None and self.zero_dtype not in ZERO_DTYPES:
            raise SchemeError(f"zero dtype {self.zero_dtype!r} is not one of {', '.join(ZERO_DTYPES)}")
        is_cast = isinstance(fmt, FloatFormat) and fmt.bits == 16
        if is_cast != (self.granularity == "none"):
            raise SchemeError(f"{self.format} is a plain cast: granularity must be 'none' exactly for fp16/bf16")
        if not isinstance(fmt, IntFormat) and not self.symmetric:
            raise SchemeError(f"{self.format} is symmetric only")
        if isinstance(fmt, IntFormat) and not self.symmetric and self.zero_dtype is None:
            raise SchemeError("an asymmetric integer scheme needs zero_dtype ('int' or a float dtype)")
        if (isinstance(fmt, IntFormat) and self.symmetric or not isinstance(fmt, IntFormat)) and self.zero_dtype:
            raise SchemeError(f"{self.format} symmetric schemes store no zero-points")

    def _check_block(self) -> None:
        facts = GGML_SCHEMES.get(self.format)
        if facts is None:
            raise SchemeError(f"granularity 'block' is for GGML types ({', '.join(GGML_SCHEMES)}), not {self.format}")
        if (self.granularity, self.group_size, self.symmetric, self.scale_dtype, self.zero_dtype) != (
                "block", facts.block_size, True, "float16", None):
            raise SchemeError(f"{self.format} is stored as GGML's blocks of {facts.block_size}: granularity 'block', "
                              f"group_size {facts.block_size}, symmetric, float16 scales, no zero dtype")

    # -- derived facts -------------------------------------------------------------------------
    @property
    def block(self) -> BlockFacts | None:
        """The GGML block type this scheme stores, or None for lowbit's own grouped layouts."""
        return GGML_SCHEMES.get(self.format) if self.granularity == "block" else None

    @property
    def layout(self) -> str:
        """The layout family that stores this scheme: ``ggml`` or ``affine`` (grouped int / float / lookup)."""
        return "ggml" if self.granularity == "block" else "affine"

    @property
    def number_format(self) -> NumberFormat:
        """The grid codes live on (asymmetric int schemes use the unsigned grid)."""
        if self.block is not None:
            raise SchemeError(f"{self.name} is a GGML block type: its grid is the type's own (see lowbit.layouts)")
        return resolve_format(self.format, self.symmetric)

    @property
    def bits(self) -> int:
        """Nominal code width (a GGML type's name: 4 for q4_k; its scales cost more, see ``bits_per_weight``)."""
        if self.block is not None:
            return self.block.bits
        return get_format(self.format).bits

    @property
    def grid(self) -> Grid:
        return Grid(self.number_format, self.symmetric, self.scale_dtype, self.zero_dtype)

    def group_dims(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        if self.block is not None:  # blocks run along each row, as for groups
            return group_dims(shape, "group", self.group_size)
        return group_dims(shape, self.granularity, self.group_size)

    @property
    def name(self) -> str:
        """Canonical string; ``parse_scheme(s.name) == s``."""
        if self.block is not None:
            return self.format
        fmt = get_format(self.format)
        base = {"fp8_e4m3fn": "fp8", "fp8_e5m2": "fp8-e5m2"}.get(self.format, self.format)
        if self.granularity == "none":
            return base
        parts = [base]
        default_sym = _default_symmetric(fmt, self.granularity)
        if self.granularity == "group":
            parts.append(f"g{self.group_size}")
        elif self.granularity == "tensor":
            parts.append("tensor")
        if isinstance(fmt, IntFormat) and self.symmetric != default_sym:
            parts.append("sym" if self.symmetric else "asym")
        default_scale = "float32" if isinstance(fmt, FloatFormat) else "float16"
        if self.scale_dtype != default_scale:
            parts.append({"float32": "sf32", "bfloat16": "sbf16", "float16": "sf16"}[self.scale_dtype])
        if self.zero_dtype not in (None, "int"):
            parts.append({"float16": "zf16", "bfloat16": "zbf16", "float32": "zf32"}[self.zero_dtype])
        return "-".join(parts)

    def __str__(self) -> str:
        return self.name

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scheme:
        if not isinstance(d, dict):
            raise SchemeError(f"a scheme must be a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise SchemeError(f"unknown scheme field(s): {', '.join(sorted(unknown))}")
        if "format" not in d:
            raise SchemeError("a scheme needs a 'format'")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> Scheme:
        return parse_scheme(text)

    def with_(self, **changes: Any) -> Scheme:
        return replace(self, **changes)


def _default_symmetric(fmt: NumberFormat, granularity: str) -> bool:
    # 8-bit integers and per-tensor ranges are symmetric by default; narrower grouped/channel grids are not.
    if not isinstance(fmt, IntFormat):
        return True
    return fmt.bits == 8 or granularity == "tensor"


_PRESETS: dict[str, Scheme] = {}


def register_preset(name: str, scheme: Scheme | str) -> Scheme:
    s = parse_scheme(scheme) if isinstance(scheme, str) else scheme
    _PRESETS[name] = s
    return s


def preset_names() -> list[str]:
    return sorted(_PRESETS)


_TOKEN = re.compile(r"^(g\d+|sym|asym|ch|tensor|sf32|sbf16|sf16|zf16|zbf16|zf32|e4m3|e5m2)$")


def parse_scheme(text: str | Scheme) -> Scheme:
    """Parse ``int4-g128``-style strings (or pass a Scheme through)."""
    if isinstance(text, Scheme):
        return text
    if not isinstance(text, str) or not text.strip():
        raise SchemeError(f"cannot parse scheme {text!r} (expected e.g. {VALID_FORMS})")
    key = text.strip().lower()
    if key in _PRESETS:
        return _PRESETS[key]
    if key in GGML_SCHEMES:
        return Scheme(key, granularity="block", group_size=GGML_SCHEMES[key].block_size)
    bad = SchemeError(f"cannot parse scheme {text!r} (expected e.g. {VALID_FORMS})")
    head, *tokens = key.split("-")
    m = re.fullmatch(r"(u?int)([2-8])|(fp8|fp16|bf16|nf4)", head)
    if not m or any(not _TOKEN.match(t) for t in tokens) or len(set(tokens)) != len(tokens):
        raise bad
    if m.group(1):
        bits = int(m.group(2))
        if bits == 7:
            raise bad
        fmt_name = f"int{bits}"
        unsigned = m.group(1) == "uint"
    else:
        fmt_name, unsigned = m.group(3), False
        if fmt_name == "fp8":
            fmt_name = "fp8_e5m2" if "e5m2" in tokens else "fp8_e4m3fn"
    if fmt_name != "fp8_e4m3fn" and fmt_name != "fp8_e5m2" and ({"e4m3", "e5m2"} & set(tokens)):
        raise bad
    fmt = get_format(fmt_name)
    if isinstance(fmt, FloatFormat) and fmt.bits == 16:
        if tokens:
            raise bad
        return Scheme(fmt_name, granularity="none")
    groups = [int(t[1:]) for t in tokens if t.startswith("g")]
    gran_tokens = [t for t in tokens if t in ("ch", "tensor")] + ["group"] * len(groups)
    if len(gran_tokens) > 1 or (groups and groups[0] < 1):
        raise bad
    granularity = {"ch": "channel", "tensor": "tensor", "group": "group"}.get(
        gran_tokens[0] if gran_tokens else "ch"
    )
    assert granularity is not None
    if "sym" in tokens and "asym" in tokens:
        raise bad
    if isinstance(fmt, IntFormat):
        symmetric = _default_symmetric(fmt, granularity)
        if unsigned:
            symmetric = False
        if "sym" in tokens:
            if unsigned:
                raise bad
            symmetric = True
        if "asym" in tokens:
            symmetric = False
    else:
        if "asym" in tokens:
            raise SchemeError(f"{fmt_name} is symmetric only: drop '-asym' from {text!r}")
        symmetric = True
    scale_dtype = "float32" if isinstance(fmt, FloatFormat) else "float16"
    for t, dt in (("sf32", "float32"), ("sbf16", "bfloat16"), ("sf16", "float16")):
        if t in tokens:
            scale_dtype = dt
    zero_dtype: str | None = None
    if isinstance(fmt, IntFormat) and not symmetric:
        zero_dtype = "int"
        for t, dt in (("zf16", "float16"), ("zbf16", "bfloat16"), ("zf32", "float32")):
            if t in tokens:
                zero_dtype = dt
    elif any(t.startswith("z") for t in tokens):
        raise SchemeError(f"{text!r}: symmetric schemes store no zero-points")
    return Scheme(
        fmt_name,
        granularity=granularity,
        group_size=groups[0] if groups else None,
        symmetric=symmetric,
        scale_dtype=scale_dtype,
        zero_dtype=zero_dtype,
    )


for _name in (
    "int8", "int8-tensor", "int6-g64", "int5-g64", "int4-g128", "int4-g64", "int4-g32", "int4-g128-sym",
    "int4-g64-sym", "int3-g128", "int3-g64", "int2-g64", "int2-g32", "fp8", "fp8-e5m2", "fp8-tensor",
    "bf16", "fp16", "nf4-g64",
):
    register_preset(_name, _name)

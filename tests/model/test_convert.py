import pytest
from torch import nn

from lowbit.errors import LowbitError
from lowbit.model.convert import CONVERSIONS, conversion_for, register_conversion
from lowbit.model.qmodules import QLinear


def test_conversions_by_name():
    assert CONVERSIONS.names() == ["conv1d", "conv2d", "embedding", "linear", "requantize_embedding",
                                   "requantize_linear", "scaled_embedding"]
    assert conversion_for(nn.Linear(4, 4)) is CONVERSIONS.get("linear")
    assert conversion_for(nn.Embedding(4, 4)) is CONVERSIONS.get("embedding")
    assert conversion_for(nn.Embedding(4, 4, max_norm=1.0)) is None


class _Subclass(nn.Linear):
    pass  # keeps nn.Linear's forward: the nn.Linear conversion accepts it too


def test_later_conversion_wins_and_names_are_unique():
    assert conversion_for(_Subclass(4, 4)) is CONVERSIONS.get("linear")

    @register_conversion(_Subclass)
    def _test_subclass(mod: nn.Module, q) -> QLinear:
        return QLinear(q, mod.bias)

    assert conversion_for(_Subclass(4, 4)) is CONVERSIONS.get("test_subclass")  # registered later: wins
    assert conversion_for(nn.Linear(4, 4)) is CONVERSIONS.get("linear")

    def _linear(mod: nn.Module, q) -> QLinear:
        return QLinear(q, mod.bias)

    with pytest.raises(LowbitError, match="conversion 'linear' is already registered"):
        register_conversion(_Subclass)(_linear)  # the default name: the function's, without leading underscores
    with pytest.raises(LowbitError, match="conversion 'embedding' is already registered"):
        register_conversion(_Subclass, name="embedding")(_linear)

import pytest

from lowbit.errors import LowbitError, SchemeError
from lowbit.registry import Registry


def test_unknown_name_lists_the_known_ones_sorted():
    reg = Registry("observer", SchemeError)
    for name in ("mse", "minmax", "percentile"):
        reg.add(name, object())
    with pytest.raises(SchemeError) as e:
        reg.get("entropy")
    assert str(e.value) == "unknown observer 'entropy' (known: minmax, mse, percentile)"
    with pytest.raises(SchemeError, match=r"^unknown observer \['x'\] \(known: "):
        reg.get(["x"])  # an unhashable name is just unknown
    assert ["x"] not in reg


def test_default_error_is_lowbit_error_and_empty_registry_says_so():
    reg = Registry("number format")
    with pytest.raises(LowbitError) as e:
        reg.get("int4")
    assert type(e.value) is LowbitError and str(e.value) == "unknown number format 'int4' (known: )"


def test_register_decorator_and_add_return_the_object():
    reg: Registry = Registry("conversion")

    @reg.register("linear")
    def linear():
        return 1

    obj = object()
    assert reg.add("embedding", obj) is obj
    assert reg.get("linear") is linear and linear() == 1 and reg.get("embedding") is obj
    assert "linear" in reg and "conv1d" not in reg and len(reg) == 2


def test_duplicates_are_refused_and_keep_the_first():
    reg = Registry("observer", SchemeError)
    first = reg.add("minmax", 1)
    with pytest.raises(SchemeError, match=r"^observer 'minmax' is already registered$"):
        reg.add("minmax", 2)
    with pytest.raises(SchemeError, match="already registered"):
        reg.register("minmax")(lambda: None)
    assert reg.get("minmax") == first and len(reg) == 1


def test_names_sorted_iteration_in_registration_order():
    reg = Registry("family")
    for i, name in enumerate(("llama", "bert", "gpt2", "gemma")):
        reg.add(name, i)
    assert reg.names() == ["bert", "gemma", "gpt2", "llama"]
    assert list(reg) == ["llama", "bert", "gpt2", "gemma"]
    assert reg.values() == [0, 1, 2, 3]
    assert reg.items() == [("llama", 0), ("bert", 1), ("gpt2", 2), ("gemma", 3)]
    for name in reg:  # iteration walks a snapshot: registering meanwhile does not break the loop
        reg.add(f"{name}-x", -1)
    assert len(reg) == 8 and "gemma-x" in reg

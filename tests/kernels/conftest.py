"""Fixtures of the kernel tests."""

import pytest

from lowbit.kernels import native


@pytest.fixture
def lib():
    """lowbit's C++ kernels (the test is skipped where they could not be built)."""
    lib = native.library()
    if lib is None:
        pytest.skip("no C++ kernels on this machine (the warning said why)")
    return lib

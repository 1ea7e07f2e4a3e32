"""Every registered op x every backend it declares x every device under test, from the registry.

See tests/matrix.py for what each check asserts. Devices come from helpers.DEVICES (cpu, cuda when
available, or SPECOPS_TEST_DEVICES); `pytest --collect-only tests/test_ops.py` lists the matrix.
"""
import pytest
from matrix import CHECK_FNS, cases, check_forced_undeclared_raises

from specops import _registry

CASES = cases()


@pytest.mark.parametrize("op,backend,device,check", CASES)
def test_op(op, backend, device, check):
    CHECK_FNS[check](op, backend, device)


@pytest.mark.parametrize("op", [o for o in _registry.OPS.values() if not o.composite and o.samples],
                         ids=lambda o: o.name)
def test_forced_backend_the_op_lacks_raises(op):
    check_forced_undeclared_raises(op)


def test_every_op_with_a_reference_has_samples():
    """The matrix covers every forward op: only backward ops (checked through their forward) lack samples."""
    backward = {o.backward for o in _registry.OPS.values() if o.backward}
    assert {n for n, o in _registry.OPS.items() if o.samples is None} <= backward

"""block_diag_matmul: bad inputs raise ValueError naming the argument, from the op's check, before any backend
runs (the test matrix in tests/test_ops.py covers values, gradients, opcheck and compile per backend)."""
import pytest
import torch

import specops


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4, 6), torch.randn(2, 3, 2)), "blocks: expected"),
    ((torch.randn(4, 7), torch.randn(2, 3, 3)), "x: last dim must be"),
    ((torch.randn(4, 6), torch.randn(2, 3, 3, dtype=torch.float64)), "blocks: dtype"),
    ((torch.randn(4, 6), torch.randn(2, 3, 3), torch.arange(5)), "perm: expected length"),
    ((torch.randn(4, 6), torch.randn(2, 3, 3), torch.arange(6, dtype=torch.int32)), "perm: expected a 1-D int64"),
])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        specops.block_diag_matmul(*args)

"""sharding: logical rules -> PartitionSpecs on an 8-device mesh."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from segjax import sharding


def test_mesh_fills_remaining_devices():
    assert jax.device_count() == 8
    m = sharding.make_mesh({"data": -1, "fsdp": 2, "model": 1})
    assert dict(m.shape) == {"data": 4, "fsdp": 2, "model": 1}
    with pytest.raises(ValueError, match="needs"):
        sharding.make_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="at most one"):
        sharding.make_mesh({"data": -1, "fsdp": -1})


def test_rules_use_each_mesh_axis_once_and_respect_divisibility():
    m = sharding.make_mesh({"data": 2, "fsdp": 4, "model": 1})
    rules = sharding.DEFAULT_RULES
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 256), m, rules) == P("fsdp", None)
    # activations: batch takes data+fsdp first, so embed stays replicated
    assert sharding.logical_to_spec(("batch", "length", "embed"), (8, 5, 64), m, rules) == \
        P(("data", "fsdp"), None, None)
    # 6 is not divisible by fsdp=4: replicated instead of an error
    assert sharding.logical_to_spec(("embed",), (6,), m, rules) == P(None)
    assert sharding.batch_divisor(m, rules) == 8

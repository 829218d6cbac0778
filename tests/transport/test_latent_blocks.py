"""Latent KV pools (multi-latent attention: one vector per token and layer) travel like K/V pools: shm and
the gRPC stream copy their blocks bit-exact, and a K/V pool and a latent pool refuse each other."""

from __future__ import annotations

import pytest
import torch

from kvmesh.engine.kv_cache import KVLayout, KVPool
from kvmesh.transport import check_transfer, copy_blocks
from kvmesh.transport.base import KVDestination
from tests.transport.test_transport import (
    bits,
    destination_pool,
    fill_random,
    make_pool,
    reference_copy,
    transfer,
)


def latent_layout(num_blocks: int = 12) -> KVLayout:
    # DeepSeek's latent is kv_lora_rank + qk_rope_head_dim wide; 24 = 16 + 8 here.
    return KVLayout(3, num_blocks, 4, 1, 24, torch.bfloat16, latent=True)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_latent_round_trip_is_bit_exact(transport: str, no_leaked_segments: None) -> None:  # noqa: F811
    src = make_pool(latent_layout(), seed=1)
    src_ids, dst_ids = [7, 2, 3, 4, 11, 0], [5, 9, 10, 11, 1, 14]
    dst_layout = latent_layout(num_blocks=16)
    with destination_pool(transport, dst_layout) as (dst, destination):
        fill_random(dst, seed=2)
        before = bits(dst.kv).clone()
        stats = transfer(transport, src, src_ids, dst, destination(dst_ids))
        assert torch.equal(bits(dst.kv), reference_copy(src, src_ids, before, dst_ids))
    assert stats.num_bytes == 6 * dst_layout.bytes_per_block == 6 * 4 * 3 * 24 * 2


def test_copy_blocks_on_latent_pools_equals_gather_scatter() -> None:
    src, dst = make_pool(latent_layout(), seed=1), KVPool(latent_layout())
    copy_blocks(src.kv, [1, 2, 3, 9], dst.kv, [4, 5, 6, 0])
    assert torch.equal(bits(dst.gather([4, 5, 6, 0])), bits(src.gather([1, 2, 3, 9])))


def test_latent_and_kv_pools_refuse_each_other_naming_both() -> None:
    latent = latent_layout()
    kv = KVLayout(3, 12, 4, 1, 24, torch.bfloat16)
    with pytest.raises(ValueError) as excinfo:
        check_transfer(latent, [0], KVDestination("grpc", (0,), kv))
    message = str(excinfo.value)
    assert "latent False vs True" not in message and "latent True vs False" in message
    assert "latent 24" in message and "K/V 1 heads x 24" in message

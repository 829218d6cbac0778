"""The engine on a CUDA device against the same weights on the CPU. Skipped without CUDA (no GPU was
lent to the session that wrote this: it has not run yet)."""

from __future__ import annotations

import pytest
import torch

from kvmesh.engine import Engine
from tests.factories import make_engine, make_model_config, random_ids

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [{}, {"num_key_value_heads": 1}, {"sliding_window": 5}])
def test_cuda_logits_and_greedy_tokens_match_the_cpu(shape):
    cpu = make_engine(make_model_config(**shape), block_size=4, prefill_chunk_size=16)
    cuda = Engine(cpu.model.to("cuda"), cpu.tokenizer, cpu.engine_config)
    assert cuda.pool.kv.device.type == "cuda"
    reference = make_engine(make_model_config(**shape), block_size=4, prefill_chunk_size=16)
    ids = random_ids(45)
    torch.testing.assert_close(cuda.logits(ids).cpu(), reference.logits(ids), atol=1e-4, rtol=1e-4)
    prompts = [random_ids(n, seed=n) for n in (5, 17, 33)]
    assert cuda.generate_batch(prompts, 12, ignore_eos=True) == reference.generate_batch(
        prompts, 12, ignore_eos=True
    )
    assert cuda.pool_usage().num_blocks_used == 0

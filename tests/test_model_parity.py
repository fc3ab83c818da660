"""The compiled model computes what AI2's reference (transformers OlmoForCausalLM) computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PARITY_PROMPTS, compile_variants, reference_logits, relative_error

from olmo_model.generate import greedy_generate
from olmo_model.runtime import ModelRunner

RTOL = 1e-4

# Each variant changes several axes at once, so that every axis is covered with few compiles.
VARIANTS = {
    "mha-silu-untied": dict(),
    "gqa-clip-gelu-tied-theta5e5": dict(num_key_value_heads=2, clip_qkv=0.5, hidden_act="gelu",
                                        tie_word_embeddings=True, rope_theta=500000.0),
    "gelu_new-linear-rope-head_dim": dict(hidden_act="gelu_new", head_dim=32,
                                          rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "relu-llama3-rope-gqa": dict(hidden_act="relu", num_key_value_heads=1,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}),
    "swish-bias": dict(hidden_act="swish", attention_bias=True),
    "gelu_pytorch_tanh": dict(hidden_act="gelu_pytorch_tanh", clip_qkv=8.0),
}


@pytest.fixture(scope="module", autouse=True)
def variants_compiled(checkpoint_factory):
    compile_variants(checkpoint_factory, VARIANTS.values())


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request, checkpoint_factory):
    folder, reference = checkpoint_factory(**VARIANTS[request.param])
    return ModelRunner.from_checkpoint(folder), reference


def test_full_prefill_logits_at_every_position(variant):
    runner, reference = variant
    prompt = PARITY_PROMPTS[1]
    runner.add_sequence(0)
    try:
        hidden = runner.forward([0], [len(prompt)], runner.embed(np.array(prompt)))
        ours = runner.logits(hidden)
    finally:
        runner.remove_sequence(0)
    assert relative_error(ours, reference_logits(reference, prompt)) < RTOL


def test_ragged_batch_of_three_prompts(variant):
    runner, reference = variant
    for seq_id in range(3):
        runner.add_sequence(seq_id)
    try:
        ours = runner.logits(runner.prefill([0, 1, 2], PARITY_PROMPTS))
    finally:
        for seq_id in range(3):
            runner.remove_sequence(seq_id)
    for row, prompt in enumerate(PARITY_PROMPTS):
        assert relative_error(ours[row], reference_logits(reference, prompt)[-1]) < RTOL


def test_sixteen_batched_decode_steps(variant):
    runner, reference = variant
    histories = [list(p) for p in PARITY_PROMPTS[:2]]
    for seq_id in (0, 1):
        runner.add_sequence(seq_id)
    try:
        last = runner.logits(runner.prefill([0, 1], histories))
        for _ in range(16):
            tokens = [int(np.argmax(row)) for row in last]
            last = runner.decode([0, 1], tokens)
            for history, token, ours in zip(histories, tokens, last):
                history.append(token)
                assert relative_error(ours, reference_logits(reference, history)[-1]) < RTOL
    finally:
        for seq_id in (0, 1):
            runner.remove_sequence(seq_id)


def test_greedy_generation_matches_transformers_generate(tiny_checkpoint):
    folder, reference = tiny_checkpoint
    runner = ModelRunner.from_checkpoint(folder)
    # Below the row count where prefill matmuls switch kernels (PARITY_PROMPTS' long ones
    # are past it: see conftest).
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    ours = greedy_generate(runner, prompt, max_new_tokens=32).tokens
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                 min_new_tokens=32)
    assert ours == out[0, len(prompt):].tolist()
    assert runner.available_pages() == runner.kv.total_pages

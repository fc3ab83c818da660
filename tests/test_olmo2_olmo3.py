"""OLMo-2 and OLMo-3: their configs read as transformers reads them, and the compiled
model computes what transformers' Olmo2ForCausalLM / Olmo3ForCausalLM compute, a
sliding window smaller than the prompt and YaRN included."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    OLMO2_TINY,
    OLMO3_TINY,
    PARITY_PROMPTS,
    compile_variants,
    hf_greedy,
    reference_logits,
    relative_error,
)

from olmo_model.artifact import compile_stages
from olmo_model.config import LayerType, ModelFamily, OLMoConfig
from olmo_model.generate import greedy_generate
from olmo_model.rope import rope_frequencies
from olmo_model.runtime import ModelRunner
from olmo_model.stages import StageSpec

RTOL = 1e-4
WINDOW = OLMO3_TINY["sliding_window"]
YARN = OLMO3_TINY["rope_scaling"]

# Each variant covers several axes at once, so that every axis is covered with few compiles
# (the RoPE scalings all take the same path, rope.py's tables: test_rope_frequencies_...
# covers each).
VARIANTS = {
    "olmo2-mha-untied": OLMO2_TINY,
    # Three sliding layers and a full one, a window smaller than every long prompt, YaRN
    # on the full layer only (transformers' reading of rope_scaling for OLMo-3).
    "olmo3-gqa-window-yarn": OLMO3_TINY,
    "olmo3-mha-tied-full-first": dict(
        family="olmo3", num_hidden_layers=3, sliding_window=WINDOW, tie_word_embeddings=True,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
}
@pytest.fixture(scope="module", autouse=True)
def variants_compiled(checkpoint_factory):
    compile_variants(checkpoint_factory, VARIANTS.values())


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request, checkpoint_factory):
    folder, reference = checkpoint_factory(**VARIANTS[request.param])
    return ModelRunner.from_checkpoint(folder), reference


def test_ragged_prefill_then_batched_decode_match_transformers(variant):
    runner, reference = variant
    histories = [list(p) for p in PARITY_PROMPTS]
    for seq_id in range(3):
        runner.add_sequence(seq_id)
    try:
        last = runner.logits(runner.prefill([0, 1, 2], histories))
        for _ in range(12):
            for history, ours in zip(histories, last):
                assert relative_error(ours, reference_logits(reference, history)[-1]) < RTOL
            tokens = [int(np.argmax(row)) for row in last]
            for history, token in zip(histories, tokens):
                history.append(token)
            last = runner.decode([0, 1, 2], tokens)
    finally:
        for seq_id in range(3):
            runner.remove_sequence(seq_id)
    assert runner.available_pages() == runner.kv.total_pages


def test_every_prefill_position_matches(variant):
    runner, reference = variant
    prompt = PARITY_PROMPTS[1]
    runner.add_sequence(0)
    try:
        # One pass of at most the window (the runner's chunk limit with sliding layers).
        chunk = runner.limits.prefill_chunk_tokens
        ours = []
        for begin in range(0, len(prompt), chunk):
            piece = prompt[begin:begin + chunk]
            ours.append(runner.logits(runner.forward([0], [len(piece)],
                                                     runner.embed(np.array(piece)))))
    finally:
        runner.remove_sequence(0)
    assert relative_error(np.concatenate(ours), reference_logits(reference, prompt)) < RTOL


def test_fork_past_the_window_then_decode(variant):
    """A prompt forked from a cached sequence past the window continues as transformers
    does (with sliding layers the fork copies its prefix: see ModelRunner.fork_sequence)."""
    runner, reference = variant
    prompt = PARITY_PROMPTS[1]
    runner.add_sequence(0)
    try:
        runner.prefill([0], [prompt[:40]])
        runner.fork_sequence(0, 1, 37)
        runner.remove_sequence(0)  # the child must not depend on the parent living
        history = prompt[:45]
        last = runner.logits(runner.prefill([1], [history[37:]]))[0]
        for _ in range(6):
            assert relative_error(last, reference_logits(reference, history)[-1]) < RTOL
            history.append(int(np.argmax(last)))
            last = runner.decode([1], [history[-1]])[0]
    finally:
        runner.remove_sequence(1)
    assert runner.available_pages() == runner.kv.total_pages


def test_greedy_generation_matches_transformers(checkpoint_factory):
    folder, reference = checkpoint_factory(**OLMO3_TINY)
    runner = ModelRunner.from_checkpoint(folder)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    assert greedy_generate(runner, prompt, max_new_tokens=40).tokens == \
        hf_greedy(reference, prompt, 40)


def test_stages_split_inside_the_sliding_pattern(checkpoint_factory):
    """A three-stage split whose middle stage starts on a sliding layer: its K/V export
    and import round-trip and its hidden states are the whole model's."""
    folder, reference = checkpoint_factory(**OLMO3_TINY)
    config = OLMoConfig.from_file(folder)
    stages = [StageSpec.of(4, 3, s) for s in range(3)]
    compile_stages(config, stages)  # side by side
    runners = [ModelRunner.from_checkpoint(folder, stage, config=config) for stage in stages]
    prompt = PARITY_PROMPTS[1]
    hidden = None
    for stage, runner in enumerate(runners):
        runner.add_sequence(0)
        chunk = runner.limits.prefill_chunk_tokens
        outputs = []
        for begin in range(0, len(prompt), chunk):
            n = min(chunk, len(prompt) - begin)
            inputs = (runner.embed(np.array(prompt[begin:begin + n])) if stage == 0
                      else hidden[begin:begin + n])
            outputs.append(runner.forward([0], [n], inputs).numpy())
        hidden = np.concatenate(outputs)
    logits = runners[-1].logits(hidden)
    assert relative_error(logits, reference_logits(reference, prompt)) < RTOL
    middle = runners[1]
    snapshot = middle.export_kv(0, len(prompt))
    middle.add_sequence(1)
    middle.import_kv(1, snapshot)
    again = middle.export_kv(1, len(prompt))
    assert np.array_equal(again.keys, snapshot.keys) and np.array_equal(again.values,
                                                                        snapshot.values)
    for runner in runners:
        runner.remove_sequence(0)
    middle.remove_sequence(1)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 2.0},
                                     {"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64},
                                     YARN, {**YARN, "beta_fast": 16, "attention_factor": 1.3}])
def test_rope_frequencies_equal_transformers(scaling):
    from transformers import Olmo2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = Olmo2Config(hidden_size=64, num_attention_heads=2, rope_theta=5e5,
                     rope_scaling=scaling, max_position_embeddings=256)
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        from transformers.models.olmo2.modeling_olmo2 import Olmo2RotaryEmbedding
        expected, factor = Olmo2RotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        expected, factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    ours, our_factor = rope_frequencies(5e5, scaling, 32, 256)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
    assert our_factor == pytest.approx(factor)


def test_olmo3_config_as_transformers_saves_it(checkpoint_factory):
    folder, reference = checkpoint_factory(**OLMO3_TINY)
    config = OLMoConfig.from_file(folder)
    assert config.family is ModelFamily.OLMO3
    assert config.layer_types == (LayerType.SLIDING,) * 3 + (LayerType.FULL,)
    assert config.sliding_layers == (0, 1, 2) and config.sliding_window == WINDOW
    assert config.rope_scaling["rope_type"] == "yarn" and config.sliding_rope_scaling is None
    assert config.rms_norm_eps == reference.config.rms_norm_eps


def test_olmo3_old_layout_and_defaults(tmp_path):
    raw = {"model_type": "olmo3", "vocab_size": 320, "hidden_size": 64,
           "num_attention_heads": 4, "num_hidden_layers": 8, "intermediate_size": 96,
           "max_position_embeddings": 256, "rope_scaling": YARN}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = OLMoConfig.from_file(tmp_path)
    # transformers' defaults: 3 sliding layers then a full one, a 4096 window, base 5e5.
    assert config.sliding_layers == (0, 1, 2, 4, 5, 6)
    assert config.sliding_window == 4096
    assert config.rope_theta == config.sliding_rope_theta == 5e5
    assert config.layer_rope(3)[1]["rope_type"] == "yarn" and config.layer_rope(0)[1] is None

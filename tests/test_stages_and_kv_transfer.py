"""Pipeline stages and KV export/import give exactly what one undivided model gives."""

from __future__ import annotations

import numpy as np
import pytest

from kv_transfer.buffers import Buffer, HostBuffer
from olmo_model.compiler import compile_model
from olmo_model.config import OLMoConfig
from olmo_model.demo import DEMO_MODEL_DIR
from olmo_model.loader import load_stage_params
from olmo_model.runtime import ModelRunner
from olmo_model.stages import StageSpec, layer_partition, stage_specs


def test_layer_partition_gives_extra_layers_to_early_stages():
    assert layer_partition(4, 3) == [0, 2, 3, 4]
    assert layer_partition(5, 3) == [0, 2, 4, 5]
    assert layer_partition(6, 3) == [0, 2, 4, 6]
    assert layer_partition(5, 1) == [0, 5]
    with pytest.raises(ValueError):
        layer_partition(2, 3)


def _stage_runner(folder, config: OLMoConfig, stage: StageSpec) -> ModelRunner:
    artifact = compile_model(config, stage)
    params = load_stage_params(folder, artifact.param_names, artifact.param_shapes, stage,
                               config.tie_word_embeddings, "float32")
    return ModelRunner(artifact, params)


# Split as other tests split them, so that these stages are compiled once for all: the
# five-layer model 3 ways (2 + 2 + 1 layers, untied head), the demo model (tied) 3 ways
# too (2 + 1 + 1), the staged shared-memory test's decode stages.
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_three_uneven_stages_equal_one_stage(five_layer_checkpoint, tied):
    folder = DEMO_MODEL_DIR if tied else five_layer_checkpoint[0]
    config = OLMoConfig.from_file(folder)
    assert config.tie_word_embeddings == tied
    whole = ModelRunner.from_checkpoint(folder)
    stages = [_stage_runner(folder, config, spec)
              for spec in stage_specs(config.num_hidden_layers, 3)]
    assert [s.stage.num_local_layers for s in stages] == ([2, 1, 1] if tied else [2, 2, 1])
    assert "embed" not in stages[1].artifact.param_names[0]

    prompts = [[4, 8, 15, 16, 23, 42], [1, 2, 3]]
    lengths = [len(p) for p in prompts]
    for runner in [whole, *stages]:
        for seq_id in (0, 1):
            runner.add_sequence(seq_id)
    expected = whole.logits(whole.forward([0, 1], lengths, whole.embed(np.concatenate(prompts))))
    hidden = stages[0].embed(np.concatenate(prompts))
    for runner in stages:
        hidden = runner.forward([0, 1], lengths, hidden)
    staged = stages[-1].logits(hidden)
    np.testing.assert_allclose(staged, expected, rtol=1e-5, atol=1e-5)

    # Decode steps flow through the stages the same way.
    tokens = [int(t) for t in np.argmax(expected[np.cumsum(lengths) - 1], axis=-1)]
    for _ in range(4):
        expected = whole.decode([0, 1], tokens)
        hidden = stages[0].embed(np.array(tokens))
        for runner in stages:
            hidden = runner.forward([0, 1], [1, 1], hidden, decode=True)
        np.testing.assert_allclose(stages[-1].logits(hidden), expected, rtol=1e-5, atol=1e-5)
        tokens = [int(t) for t in np.argmax(expected, axis=-1)]


def test_layer_groups_run_the_same_pass_and_export_each_group_midway(five_layer_checkpoint):
    """A prefill pass run group by group (as a prefill worker streams it) gives the whole
    pass's output, and each group's K/V, read while the later groups have yet to run,
    is what the cache holds at the end."""
    runner = ModelRunner.from_checkpoint(five_layer_checkpoint[0])
    groups = runner.layer_groups(3)
    assert groups == [range(0, 2), range(2, 4), range(4, 5)]
    assert runner.layer_groups(9) == [range(i, i + 1) for i in range(5)]
    prompts = [list(range(3, 40)), [5, 6, 7]]
    lengths = [len(p) for p in prompts]
    tokens = np.concatenate(prompts)
    for seq_id in (0, 1, 2, 3):
        runner.add_sequence(seq_id)
    whole = runner.logits(runner.forward([0, 1], lengths, runner.embed(tokens)))

    shape = runner.kv.snapshot_shape(lengths[0])
    out = HostBuffer(Buffer.bytes_for(shape, "float32")).arrays(shape, "float32")
    exported = []

    def after(layers):
        assert layers != groups[-1]  # the last group ends the pass: the caller sends it
        exported.append(runner.kv.export_sequence(2, lengths[0], 0, out, layers=layers))

    grouped = runner.logits(runner.forward([2, 3], lengths, runner.embed(tokens),
                                           layer_groups=groups, after_group=after))
    np.testing.assert_allclose(grouped, whole, rtol=1e-6, atol=1e-6)
    final = runner.export_kv(0, lengths[0])
    assert [(s.layer_begin, s.layer_end) for s in exported] == [(0, 2), (2, 4)]
    for snapshot in exported:
        layers = slice(snapshot.layer_begin, snapshot.layer_end)
        np.testing.assert_allclose(snapshot.keys, final.keys[layers], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(snapshot.values, final.values[layers], rtol=1e-6,
                                   atol=1e-6)


def test_kv_import_beside_a_live_sequence_decodes_identically(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    sender = ModelRunner.from_checkpoint(folder)
    receiver = ModelRunner.from_checkpoint(folder)
    untouched = ModelRunner.from_checkpoint(folder)
    prompt = list(range(40, 77))  # spans three pages
    other = [9, 9, 8, 7]

    sender.add_sequence(5)
    first = int(np.argmax(sender.logits(sender.prefill([5], [prompt]))[0]))
    snapshot = sender.export_kv(5, len(prompt))
    assert snapshot.keys.shape == (2, len(prompt), 4, 16)

    for runner in (receiver, untouched):
        runner.add_sequence(1)
        runner.prefill([1], [other])
    receiver.add_sequence(9)
    receiver.import_kv(9, snapshot)
    np.testing.assert_array_equal(receiver.export_kv(9, len(prompt)).keys, snapshot.keys)
    np.testing.assert_array_equal(receiver.export_kv(9, len(prompt)).values, snapshot.values)

    token, other_token = first, 3
    for _ in range(8):
        want = sender.decode([5], [token])[0]
        got, got_other = receiver.decode([9, 1], [token, other_token])
        want_other = untouched.decode([1], [other_token])[0]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_other, want_other)
        token = int(np.argmax(want))


def test_removing_sequences_returns_every_page(tiny_checkpoint):
    folder, _ = tiny_checkpoint
    runner = ModelRunner.from_checkpoint(folder)
    total = runner.kv.total_pages
    runner.add_sequence(0)
    runner.prefill([0], [list(range(50))])
    assert runner.available_pages() == total - 4
    runner.remove_sequence(0)
    assert runner.available_pages() == total


def test_prompt_longer_than_prefill_chunk_is_split(tiny_checkpoint):
    folder, reference = tiny_checkpoint
    from conftest import reference_logits

    from olmo_model.cache_limits import CacheLimits

    runner = ModelRunner.from_checkpoint(folder, limits=CacheLimits(prefill_chunk_tokens=16))
    prompts = [list(range(10, 50)), list(range(60, 73))]
    for seq_id in (0, 1):
        runner.add_sequence(seq_id)
    ours = runner.logits(runner.prefill([0, 1], prompts))
    for row, prompt in enumerate(prompts):
        ref = reference_logits(reference, prompt)[-1]
        assert np.abs(ours[row] - ref).max() / np.abs(ref).max() < 1e-4

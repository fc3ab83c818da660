"""The cluster config file: the shipped example loads, mistakes are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.cluster_config import ClusterConfig, ClusterConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "cluster.yaml"


def test_example_config_loads_with_overrides():
    config = ClusterConfig.from_yaml(EXAMPLE, port=6000)
    assert config.port == 6000 and config.decode.instances == 1 and not config.aggregated


@pytest.mark.parametrize("text, message", [
    ("decode: {instancs: 2}", "unknown key"),
    ("mode: sideways", "mode must be"),
    ("decode: {instances: 0}", "at least one decode"),
    ("[1, 2]", "must hold a mapping"),
    ("prefill_chunk_tokens: 0", "prefill_chunk_tokens must be"),
])
def test_bad_config_is_refused_with_reason(tmp_path, text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ClusterConfigError, match=message):
        ClusterConfig.from_yaml(path)


def test_cli_overrides_the_file():
    from cluster.cli import _cluster_config

    args = build_parser().parse_args(["serve", "--config", str(EXAMPLE), "--decode-instances",
                                      "3", "--aggregated", "--port", "7000",
                                      "--prefill-chunk-tokens", "256"])
    config = _cluster_config(args)
    assert config.decode.instances == 3 and config.aggregated and config.port == 7000
    assert config.worker_spec().limits.prefill_chunk_size == 256

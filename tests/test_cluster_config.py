"""The cluster config: one name per setting in YAML, flags and code; shipped files load;
mistakes are named, with the key that was meant."""

from __future__ import annotations

import enum
import warnings
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.cluster_config import RENAMED_KEYS, ClusterConfig
from cluster.settings import ConfigError, settings
from protos.vocabulary import Mode
from router.options import DecodeFailurePolicy

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [ROOT / "configs" / "cluster.yaml", *sorted((ROOT / "k8s").rglob("cluster.yaml"))]


STRING_EXAMPLES = {"router.clients.trusted_proxies": "10.0.0.0/8"}  # not a path


def _example_value(setting):
    """A valid value for a setting other than its default, and how a flag spells it."""
    if setting.choices:
        value = next(c for c in setting.choices if c != getattr(setting.default, "value",
                                                                   setting.default))
        return value, [value]
    if setting.kind is bool:
        return (not setting.default), [setting.flag if not setting.default
                                       else "--no-" + setting.flag[2:]]
    if setting.kind is dict:
        return {"gpu_a": 1.0}, ['{"gpu_a": 1.0}']
    if setting.kind is str:
        value = STRING_EXAMPLES.get(setting.key, "/tmp/x")
        return value, [value]
    number = {"int": 3, "float": 0.25}[setting.kind.__name__]
    if setting.key.endswith(("max_instances", "min_instances", "instances")):
        number = 1
    return number, [str(number)]


def _get(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


@pytest.mark.parametrize("setting", settings(ClusterConfig), ids=lambda s: s.key)
def test_every_setting_has_one_name_in_yaml_flags_and_code(setting):
    """The flag is the YAML key with dashes, and both reach the same field."""
    assert setting.flag == "--" + setting.key.replace(".", "-").replace("_", "-")
    value, argv = _example_value(setting)
    yaml_config = ClusterConfig.from_mapping(_nested(setting.key, value))
    args = build_parser().parse_args(["serve", *([] if argv[0].startswith("--")
                                                 else [setting.flag]), *argv])
    from cluster.cli import _load_config

    flag_config = _load_config(args)
    got = _get(yaml_config, setting.key)
    assert (got.value if isinstance(got, enum.Enum) else got) == value
    assert _get(flag_config, setting.key) == got


def _nested(key: str, value) -> dict:
    *sections, leaf = key.split(".")
    node = top = {}
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    if key == "prefill.min_instances" or key == "decode.min_instances":
        node["instances"] = value
    return top


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_parse_without_deprecated_keys(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ClusterConfig.from_yaml(path)
    assert config.decode.instances >= 1


@pytest.mark.parametrize("text, message", [
    ("decode: {instancs: 2}", "unknown config key 'decode.instancs'; did you mean "
                              "'decode.instances'"),
    ("router: {kv_wieght: 2}", "did you mean 'router.kv_weight'"),
    ("cache: {max_sequence: 2}", "did you mean 'cache.max_sequences'"),
    ("kv_layer_group: 2", "unknown config key 'kv_layer_group'; did you mean "
                          "'worker.kv_layer_groups'"),
    ("router: {limits: {max_prompt_byte: 9}}", "did you mean 'router.limits.max_prompt_bytes'"),
    ("max_prompt_byte: 9", "did you mean 'router.limits.max_prompt_bytes'"),
    ("mode: sideways", "mode must be one of disaggregated, aggregated"),
    ("router: {on_decode_failure: retry}", "on_decode_failure must be one of resume, fail"),
    ("decode: {instances: 0}", "at least one decode"),
    ("[1, 2]", "must hold a mapping"),
    ("cache: {prefill_chunk_tokens: 0}", "cache.prefill_chunk_tokens must be >= 1"),
    ("cache: {max_sequences: two}", "cache.max_sequences must be an integer"),
    ("worker: {prefix_cache: 1}", "worker.prefix_cache must be true or false"),
    ("dtype: int3", "dtype must be one of"),
    ("router: 5", "router must be a mapping"),
])
def test_bad_config_is_refused_with_reason(tmp_path, text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ClusterConfig.from_yaml(path)


def test_a_misspelt_top_level_key_suggests_the_section_key():
    with pytest.raises(ConfigError, match="did you mean 'planner.interval_s'"):
        ClusterConfig.from_mapping({"planner": {"intervals": 3}})
    with pytest.raises(ConfigError, match="did you mean 'router.token_timeout_s'"):
        ClusterConfig.from_mapping({"router": {"token_timeout": 3}})


@pytest.mark.parametrize("old, new", sorted(RENAMED_KEYS.items()))
def test_last_release_keys_still_load_with_a_warning_naming_the_new_key(old, new):
    default = _get(ClusterConfig(), new)
    value = default.value if isinstance(default, enum.Enum) else default
    value = (not value) if isinstance(value, bool) else value
    with pytest.warns(FutureWarning, match=f"'{old}' is now '{new}'"):
        config = ClusterConfig.from_mapping({old: value})
    got = _get(config, new)
    assert (got.value if isinstance(got, enum.Enum) else got) == value


def test_an_old_key_beside_its_new_one_is_refused():
    with (pytest.raises(ConfigError, match="both 'kv_weight' and 'router.kv_weight'"),
          pytest.warns(FutureWarning)):
        ClusterConfig.from_mapping({"kv_weight": 1.0, "router": {"kv_weight": 2.0}})


def test_cli_overrides_the_file_and_old_flags_warn():
    args = build_parser().parse_args(["serve", "--config", str(SHIPPED[0]),
                                      "--decode-instances", "3", "--mode", "aggregated",
                                      "--router-port", "7000",
                                      "--cache-prefill-chunk-tokens", "256"])
    from cluster.cli import _load_config

    config = _load_config(args)
    assert config.decode.instances == 3 and config.mode is Mode.AGGREGATED
    assert config.router.port == 7000 and config.router.aggregated
    assert config.worker_spec().limits.prefill_chunk_tokens == 256
    with pytest.warns(FutureWarning, match="--aggregated is now --mode"):
        args = build_parser().parse_args(["serve", "--aggregated", "--no-prefix-cache",
                                          "--kv-weight", "2", "--port", "7001"])
    config = _load_config(args)
    assert config.aggregated and not config.worker.prefix_cache
    assert config.router.kv_weight == 2.0 and config.router.port == 7001


def test_one_role_commands_take_their_sections_only():
    parser = build_parser()
    args = parser.parse_args(["decode-worker", "--cache-max-sequences", "4"])
    from cluster.cli import _load_config

    config = _load_config(args)
    assert config.cache.max_sequences == 4 and config.decode.port == 50071
    with pytest.raises(SystemExit):
        parser.parse_args(["decode-worker", "--router-kv-weight", "2"])
    args = parser.parse_args(["router", "--decode", "127.0.0.1:1", "--router-on-decode-failure",
                              "fail"])
    assert _load_config(args).router.on_decode_failure is DecodeFailurePolicy.FAIL


def test_the_router_follows_the_cluster_mode():
    config = ClusterConfig(mode="aggregated", prefill={"instances": 0})
    assert config.mode is Mode.AGGREGATED and config.router.aggregated
    assert not ClusterConfig().router.aggregated


def test_the_readme_reference_lists_every_setting():
    """README's table is `reference(ClusterConfig)`: regenerate it with
    python3 -c "from cluster.settings import reference; from cluster.cluster_config import
    ClusterConfig; print(reference(ClusterConfig))"."""
    from cluster.settings import reference

    assert reference(ClusterConfig) in (ROOT / "README.md").read_text()

from pathlib import Path

import pytest

from components.config import ConfigError, ExperimentConfig, flatten, load_config, to_yaml
from tests.conftest import REPO, TINY_EXPERIMENT, gptforge


def test_defaults_without_a_file():
    cfg = load_config(None)
    assert cfg == ExperimentConfig()
    assert cfg.serve.host == "127.0.0.1"


@pytest.mark.parametrize("path", sorted((REPO / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_file_loads(path):
    cfg = load_config(path)
    assert cfg.name


def test_dotted_overrides_are_typed():
    cfg = load_config(TINY_EXPERIMENT, ["pretrain.max_steps=7", "pretrain.lr=3e-4",
                                        "quantize.variants=[fp32,bf16]", "model.n_layer=2"])
    assert cfg.pretrain.max_steps == 7
    assert cfg.pretrain.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as a string; the float field takes it
    assert cfg.quantize.variants == ["fp32", "bf16"]
    assert cfg.model.n_layer == 2


def test_unknown_keys_and_bad_values_are_all_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\npretrain: {max_stepz: 5, use_gpu: maybe}\nbogus: {a: 1}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["finetune.method=qlora", "data.block_size=-3"])
    message = str(info.value)
    assert str(path) in message
    for expected in ["pretrain.max_stepz: unknown key", "pretrain.use_gpu: expected true or false",
                     "bogus: unknown key", "finetune.method: 'qlora' is not one of", "data.block_size: must be positive"]:
        assert expected in message


def test_bad_quantize_variant_and_malformed_override():
    with pytest.raises(ConfigError, match=r"quantize.variants: 'int3' is not one of"):
        load_config(None, ["quantize.variants=[fp32,int3]"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["pretrain.max_steps"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(TINY_EXPERIMENT, ["pretrain.max_steps=9"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    assert flatten(cfg)["pretrain.max_steps"] == 9


def test_cli_reports_a_bad_key_without_traceback(tmp_path):
    result = gptforge("run", str(TINY_EXPERIMENT), "pretrain.max_stepz=5", f"workdir={tmp_path}", cwd=tmp_path,
                      timeout=120)
    assert result.returncode == 2
    assert "pretrain.max_stepz: unknown key" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (Path(tmp_path) / "mlflow.db").exists()  # nothing started for a config that cannot run


@pytest.mark.parametrize("command", [[], ["run"], ["serve"], ["runs"]])
def test_help_says_what_each_command_does(command, tmp_path):
    result = gptforge(*command, "--help", cwd=tmp_path, timeout=120)
    assert result.returncode == 0
    assert "usage: gptforge" in result.stdout
    if command:
        assert "EXPERIMENT" in result.stdout and "key=value" in result.stdout


def test_serve_without_a_champion_says_so(tmp_path):
    result = gptforge("serve", str(TINY_EXPERIMENT), f"workdir={tmp_path}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "no model version with alias 'champion'" in result.stderr
    assert "gptforge run" in result.stderr and "Traceback" not in result.stderr


def test_candidate_settings_are_checked_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["quantize.variants=[fp32,int8_weight_only,fp32]", "evaluate.device=tpu",
                           "evaluate.cpu_threads=0", "promote.tie_breaker_mode=fastest"])
    for fragment in ["quantize.variants: fp32 listed more than once", "evaluate.device: 'tpu'",
                     "evaluate.cpu_threads", "promote.tie_breaker_mode: 'fastest'"]:
        assert fragment in str(e.value)
    cfg = load_config(None, ["quantize.variants=[fp32,int8_weight_only,int4_weight_only]", "evaluate.device=cuda"])
    assert cfg.quantize.variants == ["fp32", "int8_weight_only", "int4_weight_only"]

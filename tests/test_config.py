from pathlib import Path

import pytest

from components.experiment_file import ConfigError, ExperimentConfig, flatten, load_config, to_yaml
from tests.helpers import REPO, TINY_EXPERIMENT, gptforge


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


# Every key with the values that must be refused when the experiment loads, before anything starts.
BAD_VALUES = {
    "name": ["team/tiny", "a:b", "..", "", "-x", "x" * 101],
    "ray_num_cpus": [0, -1],
    "data.block_size": [0],
    "data.max_bytes": [-1],
    "data.val_fraction": [0, 1, ".nan", "-inf"],
    "tokenizer.vocab_size": [100],
    "model.n_layer": [0, -2],
    "model.n_head": [0],
    "model.n_embd": [0],
    "model.dropout": [-0.1, 1.0, ".nan"],
    "pretrain.lr": [".nan", "-1e-3", 0, ".inf"],
    "pretrain.min_lr": [".nan", -1, 1.0],  # 1.0 exceeds the default lr of 1e-3
    "pretrain.weight_decay": [-0.1, ".nan"],
    "pretrain.grad_clip": [".nan", -1],
    "pretrain.seed": [-1, 2**64],
    "pretrain.num_workers": [0],
    "pretrain.max_steps": [0],
    "pretrain.batch_size": [0],
    "pretrain.warmup_steps": [-1],
    "pretrain.log_every": [0],
    "finetune.lr": [".nan", -1],
    "finetune.num_workers": [0],  # a default the fine-tuning section changes keeps its rule
    "finetune.checkpoint_every": [0],
    "finetune.min_lr": [-1],
    "finetune.grad_clip": [-1],
    "finetune.seed": [-5],
    "finetune.lora_alpha": [".nan", -16, 0],
    "finetune.lora_rank": [0],
    "finetune.heldout_fraction": [0, ".nan"],
    "finetune.max_pairs": [-1],
    "quantize.variants": ["[fp32,fp32]", "[]", "[int3]"],
    "evaluate.temperature": [".nan", -0.5, "1e-39", 2.5, ".inf"],
    "evaluate.max_batches": [-1],
    "evaluate.batch_size": [0],
    "evaluate.gen_tokens": [-1],
    "promote.metric": ["eval/val_pplx", "val_ppl"],
    "promote.tie_breaker": ["model/size_byte"],
    "promote.mode": ["lowest"],
    "promote.tie_tolerance": [-1, ".nan", 1],
    "serve.port": [0, 70000],
    "serve.max_tokens_cap": [0, -1],
    "serve.max_prompt_chars": [0],
    "serve.num_cpus": [".nan", -0.5, 1.5],
}


@pytest.mark.parametrize("key, value", [(k, v) for k, values in BAD_VALUES.items() for v in values],
                         ids=lambda x: str(x)[:24])
def test_every_bad_value_is_refused_naming_its_key(key, value):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_EXPERIMENT, [f"{key}={value}"])
    assert f"  - {key}: " in str(info.value)


def test_every_number_in_the_config_refuses_nan_inf_and_a_huge_negative():
    """A generic guard: a numeric key added later is covered without a line here."""
    numeric = {k: v for k, v in flatten(load_config(None)).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numeric.update({f"model.{k}": 1 for k in ("n_layer", "n_head", "n_embd")})  # null by default, ints when set
    for key, default in numeric.items():
        bad = ["-1e9", ".nan", ".inf"] if isinstance(default, float) else [-(10**9)]
        for value in bad:
            with pytest.raises(ConfigError, match=rf"  - {key}: "):
                load_config(None, [f"{key}={value}"])


def test_promote_metric_error_lists_the_metrics_candidates_log():
    from components.metrics import CANDIDATE_METRICS

    with pytest.raises(ConfigError) as info:
        load_config(None, ["promote.metric=eval/ppl"])
    assert all(metric in str(info.value) for metric in CANDIDATE_METRICS)


def test_good_edge_values_load():
    cfg = load_config(TINY_EXPERIMENT, ["evaluate.temperature=0", "evaluate.temperature=2", "serve.num_cpus=2",
                                        "promote.tie_tolerance=0", "promote.metric=eval/tokens_per_s",
                                        "promote.mode=max", "name=team-tiny_2.v1", "pretrain.grad_clip=0"])
    assert cfg.evaluate.temperature == 2.0 and cfg.name == "team-tiny_2.v1"


def test_an_empty_section_can_be_filled_by_overrides(tmp_path):
    path = tmp_path / "empty_sections.yaml"
    path.write_text("name: x\ndata:\npretrain:\n")
    cfg = load_config(path, ["data.block_size=64", "pretrain.max_steps=3"])
    assert cfg.data.block_size == 64 and cfg.pretrain.max_steps == 3
    assert cfg.finetune == load_config(None).finetune


@pytest.mark.parametrize("override, key", [
    ("quantize.variants=[fp32,fp32]", "quantize.variants"),
    ("pretrain.lr=.nan", "pretrain.lr"),
    ("promote.tie_tolerance=-1", "promote.tie_tolerance"),
    ("promote.tie_breaker=model/size_byte", "promote.tie_breaker"),
    ("name=team/tiny", "name"),
    ("serve.max_tokens_cap=0", "serve.max_tokens_cap"),
])
def test_cli_refuses_a_bad_value_before_starting_anything(tmp_path, override, key):
    workdir = tmp_path / "work"
    result = gptforge("run", str(TINY_EXPERIMENT), override, f"workdir={workdir}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"  - {key}: " in result.stderr
    assert "Traceback" not in result.stderr
    assert not workdir.exists()  # no MLflow store, no Ray storage: nothing started


# ------------------------------------------------ training and model keys: fail before Ray starts

@pytest.mark.parametrize("override, expected", [
    ("pretrain.strategy=zero3", "pretrain.strategy: 'zero3' is not one of ddp, fsdp"),
    ("finetune.precision=int8", "finetune.precision: 'int8' is not one of auto, bf16, fp16, fp32"),
    ("pretrain.tokens_per_step=5000", "pretrain.tokens_per_step: 5000 is not a multiple of one micro-step's tokens"),
    ("pretrain.checkpoint_every=0", "pretrain.checkpoint_every: must be positive"),
    ("finetune.keep_checkpoints=0", "finetune.keep_checkpoints: must be positive"),
    ("pretrain.max_failures=-1", "pretrain.max_failures: must not be negative"),
    ("pretrain.cpus_per_worker=0", "pretrain.cpus_per_worker: must be positive"),
    ("model.preset=gpt5", "model.preset: 'gpt5' is not one of tiny, mini, gpt2"),
    ("model.n_head=3", "model.n_head: 3 heads do not divide n_embd 128"),
    ("model.pad_vocab_to=0", "model.pad_vocab_to: must be positive"),
])
def test_bad_training_and_model_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_EXPERIMENT, [override])
    assert expected in str(info.value)


def test_fsdp_with_fp16_is_refused_and_accumulation_is_derived():
    with pytest.raises(ConfigError, match="pretrain.precision: fp16 is not supported with strategy fsdp"):
        load_config(TINY_EXPERIMENT, ["pretrain.strategy=fsdp", "pretrain.precision=fp16"])
    cfg = load_config(TINY_EXPERIMENT, ["pretrain.tokens_per_step=16384"])  # 2 workers x 16 rows x 128 = 4096
    assert cfg.pretrain.grad_accum_steps(cfg.data.block_size) == 4
    assert load_config(TINY_EXPERIMENT).pretrain.grad_accum_steps(128) == 1


@pytest.mark.parametrize("overrides, expected", [
    (["pretrain.strategy=tp", "pretrain.tp_degree=3"], "pretrain.tp_degree: 3 tensor-parallel workers are more than "
                                                        "pretrain.num_workers (2)"),
    (["pretrain.strategy=tp", "pretrain.num_workers=3", "pretrain.tp_degree=3"],
     "pretrain.tp_degree: 3 does not divide the model's 4 attention heads (model.n_head)"),
    (["pretrain.strategy=fsdp+tp", "pretrain.num_workers=6", "pretrain.tp_degree=3"], "(model.n_head)"),
    (["pretrain.strategy=tp", "pretrain.num_workers=4", "pretrain.tp_degree=3"],
     "pretrain.tp_degree: 3 does not divide pretrain.num_workers (4)"),
    (["pretrain.strategy=tp", "model.n_head=6", "model.n_embd=192", "pretrain.num_workers=4", "pretrain.tp_degree=4"],
     "pretrain.tp_degree: 4 does not divide the model's 6 attention heads"),
    (["pretrain.strategy=tp", "pretrain.tp_degree=0"], "pretrain.tp_degree: must be positive, got 0"),
    (["pretrain.tp_degree=2"], "pretrain.tp_degree: 2 only applies to strategy tp or fsdp+tp"),
    (["finetune.strategy=tp", "finetune.num_workers=2", "finetune.tp_degree=2"],
     "finetune.strategy: tp and fsdp+tp do not support finetune.method lora yet"),
    (["pretrain.strategy=tp", "pretrain.tp_degree=2", "pretrain.precision=fp16"],
     "pretrain.precision: fp16 is not supported with strategy tp"),
])
def test_invalid_tensor_parallel_layouts_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_EXPERIMENT, overrides)
    assert expected in str(info.value)


def test_a_valid_tensor_parallel_layout_loads_and_shares_its_rows():
    cfg = load_config(TINY_EXPERIMENT, ["pretrain.strategy=fsdp+tp", "pretrain.num_workers=4", "pretrain.tp_degree=2",
                                        "pretrain.tokens_per_step=8192"])  # 2 groups x 16 rows x 128 = 4096
    assert cfg.pretrain.data_parallel_workers() == 2
    assert cfg.pretrain.grad_accum_steps(cfg.data.block_size) == 2
    cfg = load_config(TINY_EXPERIMENT, ["finetune.strategy=tp", "finetune.num_workers=2", "finetune.tp_degree=2",
                                        "finetune.method=full"])
    assert cfg.finetune.tp_degree == 2


@pytest.mark.parametrize("override, expected", [
    ("model.preset=gpt5", "model.preset: 'gpt5'"),
    ("pretrain.tokens_per_step=100", "pretrain.tokens_per_step: 100"),
    ("pretrain.strategy=tp pretrain.tp_degree=4", "pretrain.tp_degree: 4 tensor-parallel workers"),
])
def test_cli_refuses_model_and_training_values_before_any_stage(override, expected, tmp_path):
    result = gptforge("run", str(TINY_EXPERIMENT), *override.split(), f"workdir={tmp_path}", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (Path(tmp_path) / "mlflow.db").exists() and not (Path(tmp_path) / "runs").exists()


def test_candidate_settings_are_checked_together():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["quantize.variants=[fp32,int8_weight_only,fp32]", "evaluate.device=tpu",
                           "evaluate.cpu_threads=0", "promote.tie_breaker_mode=fastest"])
    for fragment in ["quantize.variants: 'fp32' is listed more than once", "evaluate.device: 'tpu'",
                     "evaluate.cpu_threads", "promote.tie_breaker_mode: 'fastest'"]:
        assert fragment in str(e.value)
    cfg = load_config(None, ["quantize.variants=[fp32,int8_weight_only,int4_weight_only]", "evaluate.device=cuda"])
    assert cfg.quantize.variants == ["fp32", "int8_weight_only", "int4_weight_only"]


# ------------------------------------------------ rules declared on fields, derived values

def test_every_rule_declared_on_a_field_is_enforced_by_the_checker():
    """A throwaway section with one field per kind of rule: the checker reads them from the fields alone."""
    from dataclasses import dataclass

    from components.field_rules import (at_least_1, check_fields, checked, each, fraction, must_be, non_negative,
                                        one_of, positive, reported_by)

    @dataclass(frozen=True)
    class Inner:
        share: float = checked(0.5, fraction)

    @dataclass(frozen=True)
    class Section:
        count: int = checked(1, positive)
        offset: int = checked(0, non_negative)
        size: int = checked(1, at_least_1)
        optional: int | None = checked(None, positive)
        mode: str = checked("a", one_of("a", "b"))
        lazy_mode: str = checked("a", one_of(lambda: ("a",)))
        items: list[str] = checked(["a"], each(one_of("a", "b")))
        even: int = checked(2, must_be(lambda v: v % 2 == 0, "must be even"))
        word: str = checked("ok", reported_by(lambda v: None if v.isalpha() else f"{v!r} is not a word"))
        rate: float = checked(1.0)  # no rule: only the finite check
        inner: Inner = Inner()

    assert check_fields(Section()) == []
    bad = Section(count=0, offset=-1, size=0, optional=0, mode="c", lazy_mode="b", items=["a", "x", "y"], even=3,
                  word="no way", rate=float("nan"), inner=Inner(share=1.0))
    assert check_fields(bad, "s.") == [
        "s.count: must be positive, got 0",
        "s.offset: must not be negative, got -1",
        "s.size: must be at least 1, got 0",
        "s.optional: must be positive, got 0",
        "s.mode: 'c' is not one of a, b",
        "s.lazy_mode: 'b' is not one of a",
        "s.items: 'x' is not one of a, b",
        "s.items: 'y' is not one of a, b",
        "s.even: must be even, got 3",
        "s.word: 'no way' is not a word",
        "s.rate: must be a finite number, got nan",
        "s.inner.share: must be between 0 and 1 (exclusive), got 1.0",
    ]
    assert Section().items is not Section().items  # a list default is copied per instance


def test_every_number_and_choice_in_the_config_declares_a_rule():
    """A numeric key added later without a rule fails here, not in a run."""
    import dataclasses
    import typing

    from components.field_rules import rules_of

    def sections(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from sections(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", hints[f.name], f

    unruled = [key for key, hint, f in sections(ExperimentConfig)
               if hint in (int, float, int | None) and not rules_of(f)]
    assert unruled == []
    for key in ("pretrain.strategy", "finetune.precision", "finetune.method", "model.preset", "evaluate.device",
                "promote.mode", "promote.tie_breaker_mode", "quantize.variants", "name"):
        section, _, name = key.rpartition(".")
        cls = type(getattr(ExperimentConfig(), section)) if section else ExperimentConfig
        assert rules_of({f.name: f for f in dataclasses.fields(cls)}[name]), key


def test_the_vocab_minimum_is_the_tokenizers():
    from components.tokenizer import MIN_VOCAB_SIZE

    assert load_config(None, [f"tokenizer.vocab_size={MIN_VOCAB_SIZE}"]).tokenizer.vocab_size == MIN_VOCAB_SIZE
    with pytest.raises(ConfigError, match=rf"tokenizer.vocab_size: must be at least {MIN_VOCAB_SIZE} "):
        load_config(None, [f"tokenizer.vocab_size={MIN_VOCAB_SIZE - 1}"])


def test_quantize_variants_are_the_quantize_modules():
    from components.quantize import VARIANTS

    cfg = load_config(None, [f"quantize.variants=[{','.join(VARIANTS)}]"])
    assert tuple(cfg.quantize.variants) == VARIANTS


def test_training_sections_derive_workers_and_accumulation():
    from components.config import PretrainConfig

    ddp = PretrainConfig(num_workers=4, batch_size=8, tokens_per_step=4 * 8 * 64 * 3)
    assert ddp.data_parallel_workers() == 4
    assert ddp.micro_step_tokens(64) == 4 * 8 * 64
    assert ddp.grad_accum_steps(64) == 3
    assert PretrainConfig(num_workers=4, batch_size=8).grad_accum_steps(64) == 1  # tokens_per_step 0: one micro-step
    tp = PretrainConfig(num_workers=4, tp_degree=2, strategy="tp", batch_size=8, tokens_per_step=2 * 8 * 64 * 2)
    assert tp.data_parallel_workers() == 2 and tp.grad_accum_steps(64) == 2
    assert PretrainConfig(num_workers=4, tp_degree=2, strategy="ddp").data_parallel_workers() == 4


def test_model_section_derives_its_shape_and_padded_vocab():
    from components.config import ModelConfig
    from components.model import PRESETS

    assert ModelConfig().shape() == PRESETS["tiny"]
    assert ModelConfig(preset="mini", n_layer=2).shape() == {**PRESETS["mini"], "n_layer": 2}
    assert ModelConfig(preset="gpt5").shape() is None and ModelConfig(n_head=0).shape() is None
    assert ModelConfig().padded_vocab(1000) == 1000
    assert ModelConfig(pad_vocab_to=64).padded_vocab(1000) == 1024
    assert ModelConfig(pad_vocab_to=64).padded_vocab(1024) == 1024


def test_finetune_section_says_whether_it_uses_lora():
    from components.config import FinetuneConfig

    assert FinetuneConfig().uses_lora and not FinetuneConfig(method="full").uses_lora


# ------------------------------------------------ keys given twice, unreadable files, empty text, `#` in overrides

def test_a_key_or_a_section_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: x\npretrain:\n  max_steps: 5\n  strategy: ddp\n  strategy: fsdp\n"
                    "finetune: {max_steps: 3}\npretrain:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "  - pretrain.strategy: given twice, on lines 4 and 5" in message
    assert "  - pretrain: given twice, on lines 2 and 7" in message
    with pytest.raises(ConfigError, match=r"override 'data=\{source: a, source: b\}': source: given twice"):
        load_config(None, ["data={source: a, source: b}"])


def test_a_yaml_merge_key_may_still_be_replaced(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("pretrain: &train {max_steps: 5, lr: 1.0e-3}\nfinetune:\n  <<: *train\n  max_steps: 7\n")
    cfg = load_config(path)
    assert cfg.pretrain.max_steps == 5 and cfg.finetune.max_steps == 7 and cfg.finetune.lr == 1e-3


@pytest.mark.parametrize("override, expected", [
    ("pretrain.lr=" + "1" * 400, "pretrain.lr: an integer of 400 digits is too large for a number"),
    ("pretrain.max_steps=" + "9" * 400, "pretrain.max_steps: an integer of 400 digits does not fit in 64 bits"),
    ("pretrain.max_steps=" + "9" * 5000, "pretrain.max_steps: expected an integer, got '999"),
    ("model.n_layer=" + "[" * 5000, "model.n_layer: expected int or null, got '[[["),
])
def test_huge_and_deep_values_are_config_errors(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value) and len(str(info.value)) < 400


def _bad_experiments(root: Path) -> dict[str, tuple[Path, str]]:
    """Experiment paths that cannot be read as an experiment, each with what the error must say."""
    root.mkdir()
    huge_float, latin1, deep, huge_int = (root / n for n in ("huge.yaml", "latin1.yaml", "deep.yaml", "digits.yaml"))
    huge_float.write_text("pretrain:\n  lr: " + "1" * 400 + "\n")
    latin1.write_bytes("name: x\ndata:\n  source: caf\xe9\n".encode("latin-1"))
    deep.write_text("name: " + "[" * 5000 + "\n")
    huge_int.write_text("pretrain:\n  max_steps: " + "9" * 5000 + "\n")
    (root / "folder.yaml").mkdir()
    return {
        "huge float": (huge_float, "pretrain.lr: an integer of 400 digits is too large for a number"),
        "not utf-8": (latin1, f"{latin1}:3: not UTF-8 text (byte 0xe9)"),
        "a folder": (root / "folder.yaml", "is a folder, not an experiment file"),
        "nested too deeply": (deep, "nested too deeply"),
        "over 4300 digits": (huge_int, "a value cannot be read: Exceeds the limit (4300 digits)"),
    }


def test_unreadable_experiments_are_config_errors(tmp_path):
    for what, (path, expected) in _bad_experiments(tmp_path / "bad").items():
        with pytest.raises(ConfigError) as info:
            load_config(path)
        assert expected in str(info.value), what


def test_the_cli_refuses_unreadable_experiments_with_exit_2_and_no_traceback(tmp_path):
    for what, (path, expected) in _bad_experiments(tmp_path / "bad").items():
        result = gptforge("run", str(path), f"workdir={tmp_path / 'work'}", cwd=tmp_path, timeout=120)
        assert (result.returncode, "Traceback" in result.stderr) == (2, False), (what, result.stderr[-2000:])
        assert expected in result.stderr, (what, result.stderr[-2000:])
    assert not (tmp_path / "work").exists()


def _text_fields():
    """(dotted key, is a list) of every str and list-of-str field, through every section and the top level."""
    import dataclasses
    import typing

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif hint in (str, str | None):
                yield f"{prefix}{f.name}", False
            elif hint == list[str]:
                yield f"{prefix}{f.name}", True

    return list(walk(ExperimentConfig))


# Text that may be empty, and why; every other text field must refuse '' (a path, a host, a name, a choice).
MAY_BE_EMPTY = {
    "storage": "empty means the workdir",
    "evaluate.prompts": "an empty prompt is generated from <|endoftext|>",
    "evaluate.suite": "empty means the suite pinned for the experiment",
}


@pytest.mark.parametrize("key, is_list", _text_fields(), ids=lambda x: str(x))
def test_every_text_field_refuses_an_empty_string_unless_empty_has_a_meaning(key, is_list):
    blank = ["''", "'  '"] if key not in MAY_BE_EMPTY else ["''"]
    for value in blank:
        override = f"{key}=[{value}]" if is_list else f"{key}={value}"
        if key in MAY_BE_EMPTY:
            load_config(None, [override])
            continue
        with pytest.raises(ConfigError) as info:
            load_config(None, [override])
        assert f"  - {key}: " in str(info.value)


def test_an_empty_path_or_host_in_a_file_names_its_key(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("workdir: ''\ndata: {source: ''}\nfinetune: {source: ' '}\nserve: {host: ''}\nstorage: ''\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for key in ("workdir", "data.source", "finetune.source", "serve.host"):
        assert f"  - {key}: must not be empty" in str(info.value)
    assert "storage" not in str(info.value)


@pytest.mark.parametrize("override, key, expected", [
    ("workdir=/tmp/run #2", "workdir", "/tmp/run #2"),
    ("data.source=corpus #1/notes", "data.source", "corpus #1/notes"),
    ("serve.host=my#host", "serve.host", "my#host"),
    (r"""evaluate.prompts=["# a comment\n", 'x #y']""", "evaluate.prompts", ["# a comment\n", "x #y"]),
    ("quantize.variants=[fp32, int8_dynamic]", "quantize.variants", ["fp32", "int8_dynamic"]),
    ("quantize.variants=[fp32,bf16]", "quantize.variants", ["fp32", "bf16"]),
    ("pretrain.lr=3e-4", "pretrain.lr", 3e-4),
    ("model.n_layer=", "model.n_layer", None),
    ("name='tiny'", "name", "tiny"),
])
def test_overrides_keep_a_hash_as_a_character(override, key, expected):
    assert flatten(load_config(None, [override]))[key] == expected


def test_a_comment_after_an_override_value_is_not_silently_dropped():
    with pytest.raises(ConfigError, match=r"pretrain.max_steps: expected an integer, got '5 # five'"):
        load_config(None, ["pretrain.max_steps=5 # five"])


def test_a_workdir_with_a_hash_survives_the_round_trip_through_the_record(tmp_path):
    cfg = load_config(TINY_EXPERIMENT, [f"workdir={tmp_path}/run #2"])
    (tmp_path / "resolved.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "resolved.yaml").workdir == f"{tmp_path}/run #2"
    assert load_config(tmp_path / "resolved.yaml", [f"workdir={cfg.workdir}"]) == cfg

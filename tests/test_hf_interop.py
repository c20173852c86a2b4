"""Hugging Face GPT-2 in and out: real transformers models, real files, a real MLflow registry."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from components.files import IntegrityError, verify_checksums
from components.hf_gpt2 import ConversionError, export_hf, from_hf_state_dict, gpt_shapes, hf_shapes, import_hf, \
    to_hf_state_dict
from components.model import GPT, PRESETS, GPTConfig, config_from_preset, load_model, save_model
from components.tokenizer import EOT, TOKENIZER_FILE, train_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "hello world, hello GPT-2\n"] * 10
SAMPLE = "def add(x, y):<|endoftext|>hello print(i)"


def _gpt2_like_tokenizer() -> Tokenizer:
    """A byte-level BPE with <|endoftext|> as its last id, as in GPT-2 (50256 there)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer.add_special_tokens([EOT])
    return tokenizer


def _hf_folder(folder: Path, activation="gelu", seed=0, **config) -> tuple[Path, object, Tokenizer]:
    """A random GPT2LMHeadModel and its tokenizer, saved as save_pretrained writes them."""
    tokenizer = _gpt2_like_tokenizer()
    torch.manual_seed(seed)
    eot = tokenizer.token_to_id(EOT)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32,
                                        vocab_size=tokenizer.get_vocab_size(), activation_function=activation,
                                        bos_token_id=eot, eos_token_id=eot, **config)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.save_pretrained(folder)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT, bos_token=EOT).save_pretrained(folder)
    return folder, model, tokenizer


def _ids(vocab: int, block: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, block), generator=torch.Generator().manual_seed(1))


def _gptforge_folder(folder: Path, bias=True, vocab_rows=320, seed=0) -> tuple[GPT, Tokenizer]:
    """A random gptforge model with vocabulary padding rows, and a tokenizer with <|endoftext|> at id 0."""
    tokenizer = train_tokenizer(TEXTS, vocab_size=300)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=vocab_rows, n_layer=2, n_head=2, n_embd=16, bias=bias)).eval()
    with torch.no_grad():  # nonzero biases and norms, so that a mix-up of them shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_model(model, str(folder))
    tokenizer.save(str(folder / TOKENIZER_FILE))
    return model, tokenizer


def _load_hf(folder: Path):
    model, info = transformers.GPT2LMHeadModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize("pad_vocab_to", [1, 64])
def test_an_imported_gpt2_gives_the_same_logits_and_keeps_its_tokenizer(tmp_path, pad_vocab_to):
    src, hf, tokenizer = _hf_folder(tmp_path / "hf")
    done = import_hf(src, tmp_path / "out", pad_vocab_to=pad_vocab_to)
    vocab = tokenizer.get_vocab_size()
    assert done.config.vocab_size == (vocab if pad_vocab_to == 1 else 320) and done.tokens == vocab
    assert done.eot_id == vocab - 1 and not done.tanh_gelu
    verify_checksums(tmp_path / "out", ["model.safetensors", "config.json", TOKENIZER_FILE], done.checksums_sha256)

    model = load_model(str(tmp_path / "out"))
    assert model.transformer.wte.weight is model.lm_head.weight
    idx = _ids(vocab, 32)
    with torch.no_grad():
        ours, theirs = model(idx)[0], hf(idx).logits
    torch.testing.assert_close(ours[..., :vocab], theirs, atol=1e-5, rtol=1e-5)
    if pad_vocab_to > 1:  # a padding row is the mean of the real ones: its logit is their mean, never the top
        assert torch.allclose(ours[..., vocab:], theirs.mean(-1, keepdim=True).expand(-1, -1, 320 - vocab), atol=1e-5)

    kept = Tokenizer.from_file(str(tmp_path / "out" / TOKENIZER_FILE))
    assert kept.token_to_id(EOT) == vocab - 1 and kept.encode(SAMPLE).ids == tokenizer.encode(SAMPLE).ids


def test_gpt2s_tanh_gelu_is_flagged_and_stays_close(tmp_path):
    src, hf, tokenizer = _hf_folder(tmp_path / "hf", activation="gelu_new")
    done = import_hf(src, tmp_path / "out")
    assert done.tanh_gelu
    idx = _ids(tokenizer.get_vocab_size(), 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "out"))(idx)[0], hf(idx).logits, atol=1e-3, rtol=0)


def test_pickled_weights_and_vocab_merges_files_import_alike(tmp_path):
    src, hf, tokenizer = _hf_folder(tmp_path / "hf")
    weights = safetensors.torch.load_file(str(src / "model.safetensors"))
    os.remove(src / "model.safetensors")
    torch.save(weights, src / "pytorch_model.bin")
    spec = json.loads(tokenizer.to_str())["model"]
    vocab = {**spec["vocab"], EOT: tokenizer.token_to_id(EOT)}  # GPT-2's vocab.json lists it too
    (src / "vocab.json").write_text(json.dumps(vocab))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    os.remove(src / TOKENIZER_FILE)

    import_hf(src, tmp_path / "out")
    idx = _ids(tokenizer.get_vocab_size(), 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "out"))(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)
    rebuilt = Tokenizer.from_file(str(tmp_path / "out" / TOKENIZER_FILE))
    assert rebuilt.encode(SAMPLE).ids == tokenizer.encode(SAMPLE).ids
    assert rebuilt.token_to_id(EOT) == tokenizer.token_to_id(EOT)


def _original_gpt2_layout(src: Path, weights: dict) -> None:
    """As the original `gpt2` checkpoint: GPT2Model keys (no `transformer.`) and the causal-mask buffers."""
    bare = {k.removeprefix("transformer."): v for k, v in weights.items()}
    for layer in range(2):
        bare[f"h.{layer}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
        bare[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    safetensors.torch.save_file(bare, str(src / "model.safetensors"), metadata={"format": "pt"})


def _sharded(src: Path, weights: dict) -> None:
    """As save_pretrained writes a checkpoint over its shard size: two files and an index."""
    keys = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": keys[:10], "model-00002-of-00002.safetensors": keys[10:]}
    for name, part in shards.items():
        safetensors.torch.save_file({k: weights[k] for k in part}, str(src / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    os.remove(src / "model.safetensors")


@pytest.mark.parametrize("layout", [_original_gpt2_layout, _sharded])
def test_other_checkpoint_layouts_import_alike(tmp_path, layout):
    src, hf, tokenizer = _hf_folder(tmp_path / "hf")
    layout(src, safetensors.torch.load_file(str(src / "model.safetensors")))
    import_hf(src, tmp_path / "out")
    idx = _ids(tokenizer.get_vocab_size(), 32)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "out"))(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)


def test_a_pickle_that_is_more_than_tensors_is_refused_unrun(tmp_path):
    src, _, _ = _hf_folder(tmp_path / "hf")
    os.remove(src / "model.safetensors")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"transformer.wte.weight": Payload()}, src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="cannot read the weights"):
        import_hf(src, tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def _edit_weights(src: Path, edit) -> None:
    weights = safetensors.torch.load_file(str(src / "model.safetensors"))
    edit(weights)
    safetensors.torch.save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.update({"transformer.h.1.mlp.c_fc.weight": torch.zeros(64, 16)}),
     r"transformer\.h\.1\.mlp\.c_fc\.weight has shape \(64, 16\), expected \(16, 64\)"),
    (lambda w: w.pop("transformer.h.1.ln_2.bias"), r"missing transformer\.h\.1\.ln_2\.bias"),
    (lambda w: w.update({"transformer.h.2.ln_1.weight": torch.ones(16)}), r"unexpected key transformer\.h\.2\.ln_1"),
    (lambda w: w.update({"lm_head.weight": torch.randn_like(w["transformer.wte.weight"])}),
     r"lm_head\.weight differs from transformer\.wte\.weight"),
])
def test_weights_that_do_not_fit_are_refused_naming_the_key(tmp_path, edit, message):
    src, _, _ = _hf_folder(tmp_path / "hf")
    _edit_weights(src, edit)
    with pytest.raises(ConversionError, match=message):
        import_hf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("activation_function", "relu"), ("n_inner", 10),
                                        ("layer_norm_epsilon", 1e-6), ("scale_attn_by_inverse_layer_idx", True),
                                        ("model_type", "llama")])
def test_a_config_gptforge_cannot_run_is_refused_naming_the_key(tmp_path, key, value):
    src, _, _ = _hf_folder(tmp_path / "hf")
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, key: value}))
    with pytest.raises(ConversionError, match=rf"config\.json: not a GPT-2 gptforge can run: {key}="):
        import_hf(src, tmp_path / "out")


def test_a_tokenizer_with_more_ids_than_the_vocabulary_is_refused(tmp_path):
    src, _, tokenizer = _hf_folder(tmp_path / "hf")
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "vocab_size": 200}))
    with pytest.raises(ConversionError, match=rf"tokenizer\.json: has ids up to {tokenizer.get_vocab_size() - 1} but "
                                              rf".*config\.json says vocab_size=200"):
        import_hf(src, tmp_path / "out")


def test_missing_files_and_a_used_output_folder_are_refused(tmp_path):
    src, _, _ = _hf_folder(tmp_path / "hf")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("mine")
    with pytest.raises(ConversionError, match="already exists and is not an empty folder"):
        import_hf(src, tmp_path / "used")
    assert (tmp_path / "used" / "x").read_text() == "mine"
    os.remove(src / "model.safetensors")
    with pytest.raises(ConversionError, match="no weights: expected model.safetensors, "):
        import_hf(src, tmp_path / "out")
    os.remove(src / TOKENIZER_FILE)
    with pytest.raises(ConversionError, match="no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"):
        import_hf(src, tmp_path / "out")
    with pytest.raises(ConversionError, match=r"nowhere/config\.json: cannot be read"):
        import_hf(tmp_path / "nowhere", tmp_path / "out")


# ----------------------------------------------------------------------------- export


@pytest.mark.parametrize("bias", [True, False])
def test_an_exported_model_loads_in_transformers_with_the_same_logits(tmp_path, bias):
    model, tokenizer = _gptforge_folder(tmp_path / "ours", bias=bias)
    done = export_hf(tmp_path / "ours", tmp_path / "hf")
    vocab = tokenizer.get_vocab_size()
    assert done.tokens == vocab < model.config.vocab_size and done.zero_biases is (not bias) and done.eot_id == 0

    hf, hf_tokenizer = _load_hf(tmp_path / "hf")
    assert hf.config.vocab_size == vocab and hf.config.eos_token_id == 0 and hf.config.n_positions == 32
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in gptforge
    idx = _ids(vocab, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0][..., :vocab], atol=1e-5, rtol=1e-5)
    assert hf_tokenizer(SAMPLE)["input_ids"] == tokenizer.encode(SAMPLE).ids
    assert hf_tokenizer.eos_token == EOT and hf_tokenizer.eos_token_id == 0


def test_round_trip_keeps_every_weight(tmp_path):
    model, tokenizer = _gptforge_folder(tmp_path / "ours", vocab_rows=300)
    assert tokenizer.get_vocab_size() == 300  # no padding rows: every weight survives the trip
    export_hf(tmp_path / "ours", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    again = load_model(str(tmp_path / "back"))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_export_refuses_what_it_cannot_write(tmp_path):
    _gptforge_folder(tmp_path / "small", vocab_rows=200)  # fewer rows than the tokenizer's 300 tokens
    with pytest.raises(ConversionError, match=r"the tokenizer has \d+ tokens but the model only 200 embedding rows"):
        export_hf(tmp_path / "small", tmp_path / "hf")
    model, _ = _gptforge_folder(tmp_path / "bad")
    weights = safetensors.torch.load_file(str(tmp_path / "bad" / "model.safetensors"))
    weights["transformer.h.0.attn.c_proj.weight"] = torch.zeros(16, 8)
    safetensors.torch.save_file(weights, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"transformer\.h\.0\.attn\.c_proj\.weight has shape \(16, 8\), "
                                              r"expected \(16, 16\)"):
        export_hf(tmp_path / "bad", tmp_path / "hf")
    os.remove(tmp_path / "bad" / TOKENIZER_FILE)
    with pytest.raises(ConversionError, match=r"bad/tokenizer\.json: cannot be read"):
        export_hf(tmp_path / "bad", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_candidate_is_checked_and_an_int8_one_refused(tmp_path):
    from tests.helpers import make_candidate

    make_candidate(tmp_path / "int8", "int8_dynamic")
    with pytest.raises(ConversionError, match="holds a 'int8_dynamic' model; export a float one"):
        export_hf(tmp_path / "int8", tmp_path / "hf")
    pin = make_candidate(tmp_path / "fp32", "fp32")
    (tmp_path / "fp32" / "tokenizer.json").write_bytes(b"{}")
    with pytest.raises(IntegrityError, match="tokenizer.json: sha256 does not match"):
        export_hf(tmp_path / "fp32", tmp_path / "hf", pin)


# ----------------------------------------------------------------------------- GPT-2 presets


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_maps_onto_gpt2s_keys_and_shapes(preset):
    """On the meta device: the real GPT-2 sizes, nothing allocated; gptforge's vocabulary padded to 64."""
    hf_vocab = 50257
    cfg = config_from_preset(preset, block_size=1024, vocab_size=50304)
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, n_positions=1024, vocab_size=hf_vocab))
        ours = GPT(cfg).state_dict()
    theirs = hf.state_dict()
    imported = from_hf_state_dict(theirs, cfg, hf_vocab, preset)
    assert {k: tuple(v.shape) for k, v in imported.items()} == gpt_shapes(cfg)
    exported, zero_biases = to_hf_state_dict(ours, cfg, hf_vocab, preset)
    expected = {k: tuple(v.shape) for k, v in theirs.items() if k != "lm_head.weight"}
    assert {k: tuple(v.shape) for k, v in exported.items()} == expected == hf_shapes(cfg, hf_vocab)
    assert not zero_biases


# ----------------------------------------------------------------------------- CLI and registry


def test_the_cli_converts_and_refuses_without_a_traceback(tmp_path, capsys):
    from pipelines.cli import main

    src, _, tokenizer = _hf_folder(tmp_path / "hf", activation="gelu_new")
    vocab = tokenizer.get_vocab_size()
    assert main(["import-hf", str(src), str(tmp_path / "out"), "--pad-vocab-to", "64"]) == 0
    out = capsys.readouterr().out
    assert f"vocab_size=320 ({320 - vocab} padding rows)" in out and f"<|endoftext|> id {vocab - 1}" in out
    assert "tanh approximation of GELU" in out
    assert main(["export-hf", str(tmp_path / "out"), str(tmp_path / "back")]) == 0
    assert f"vocab_size={vocab}, <|endoftext|> id {vocab - 1}" in capsys.readouterr().out
    _load_hf(tmp_path / "back")
    capsys.readouterr()  # transformers' progress bars

    _edit_weights(src, lambda w: w.pop("transformer.wpe.weight"))
    assert main(["import-hf", str(src), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge: error: ") and "missing transformer.wpe.weight" in err and "Traceback" not in err
    assert main(["export-hf", "models:/x", str(tmp_path / "x")]) == 2
    assert "use models:/NAME/VERSION, or models:/NAME followed by @ALIAS" in capsys.readouterr().err


@pytest.mark.integration
def test_the_registered_champion_exports_and_loads_in_transformers(tmp_path, capsys):
    from components.experiment_file import load_config
    from pipelines.cli import main
    from pipelines.model_loading import RegistryLoader
    from pipelines.registry import CHECKSUMS_TAG, register
    from pipelines.tracking import Tracker
    from tests.helpers import make_candidate, promote_candidates

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["name=hfexport"])
    tracker = Tracker(uri, cfg.name, artifact_location=str(tmp_path / "artifacts"))
    decision, version = promote_candidates(tracker, cfg, tmp_path, {"fp32": 10.0})
    assert decision.promote
    champion = RegistryLoader(uri, cfg.name, str(tmp_path / "serving"))()

    for ref in (f"models:/{cfg.name}@champion", f"models:/{cfg.name}/{version}"):
        out = tmp_path / ref.replace("/", "_").replace(":", "").replace("@", "_")
        assert main(["export-hf", ref, str(out), "--tracking-uri", uri]) == 0, capsys.readouterr().err
        hf, hf_tokenizer = _load_hf(out)
        vocab = champion.tokenizer.get_vocab_size()
        idx = _ids(vocab, 32)
        with torch.no_grad():
            torch.testing.assert_close(hf(idx).logits, champion.model(idx)[0][..., :vocab], atol=1e-5, rtol=1e-5)
        assert hf_tokenizer("def add(a, b):")["input_ids"] == champion.tokenizer.encode("def add(a, b):").ids

    assert main(["export-hf", f"models:/{cfg.name}@nope", str(tmp_path / "n"), "--tracking-uri", uri]) == 2
    assert "no model version with alias 'nope'" in capsys.readouterr().err
    with tracker.run("candidate") as run:  # a version registered without its pin
        make_candidate(tmp_path / "hand", "fp32")
        run.log_artifacts(str(tmp_path / "hand"), "model")
    unpinned = register(uri, cfg.name, run.run_id, "model", {})
    assert main(["export-hf", f"models:/{cfg.name}/{unpinned}", str(tmp_path / "u"), "--tracking-uri", uri]) == 2
    assert f"no {CHECKSUMS_TAG} tag" in capsys.readouterr().err and not (tmp_path / "u").exists()

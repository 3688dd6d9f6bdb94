"""Our decoder against transformers on tiny random checkpoints, RoPE scaling, and the loader's errors."""

import json
import math

import pytest
import torch

from longserve.engine.errors import ModelLoadError
from longserve.engine.loader import load_model, resolve_dtype, resolve_model_path
from longserve.engine.models import DecoderModel, ModelConfig, RotaryEmbedding, apply_rope, parse_rope_config
from longserve.engine.testing import greedy_generate, run_sequence, tiny_checkpoint, tiny_config_dict
from longserve.kernels.base import AttentionMetadata, StepState
from longserve.kernels.registry import build_backend

transformers = pytest.importorskip("transformers")

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]
PROMPT = [(37 * i + 11) % 250 + 3 for i in range(45)]


def hf_model(path):
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def hf_logits(path, ids):
    return hf_model(path)(torch.tensor([ids])).logits[0].float()


def ours(path, dtype="float32"):
    return load_model(str(path), "cpu", dtype).model


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tmp_path, arch):
    path = tiny_checkpoint(tmp_path / arch, arch=arch, seed=ARCHS.index(arch))
    model = ours(path)
    want = hf_logits(path, PROMPT)
    torch.testing.assert_close(run_sequence(model, PROMPT), want, atol=1e-4, rtol=0)
    # chunked prefill over a scattered paged cache (odd chunk and block sizes) gives the same logits
    torch.testing.assert_close(run_sequence(model, PROMPT, chunk=7, block_size=3, seed=5), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_match_transformers(tmp_path, arch):
    path = tiny_checkpoint(tmp_path / arch, arch=arch, seed=10 + ARCHS.index(arch))
    got = greedy_generate(ours(path), PROMPT[:9], 32, block_size=4)
    ref, ids = hf_model(path), list(PROMPT[:9])
    with torch.no_grad():
        for _ in range(32):  # full recompute each step: independent of transformers' own KV cache
            ids.append(int(ref(torch.tensor([ids])).logits[0, -1].argmax()))
    assert got == ids[9:]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tied_embeddings_and_biases(tmp_path, arch):
    extra = {"attention_bias": True} if arch != "qwen2" else {}
    if arch == "llama":
        extra["mlp_bias"] = True
    path = tiny_checkpoint(tmp_path / arch, arch=arch, tie_word_embeddings=True, seed=3, **extra)
    model = ours(path)
    assert model.lm_head is None and model.config.tie_word_embeddings
    if arch == "llama":
        assert model.config.mlp_bias and model.config.o_proj_bias
    torch.testing.assert_close(run_sequence(model, PROMPT[:20]), hf_logits(path, PROMPT[:20]), atol=1e-4, rtol=0)


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "yarn-mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                    "mscale": 1.0, "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                              "attention_factor": 1.3, "truncate": False},
}


@pytest.mark.parametrize("variant", list(ROPE_VARIANTS))
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_rope_scaling_matches_transformers(tmp_path, variant, arch):
    rope = {"rope_theta": 500.0, **ROPE_VARIANTS[variant]}
    # max_position_embeddings 24 < prompt: dynamic NTK actually rescales (transformers uses the prompt length)
    path = tiny_checkpoint(tmp_path / "m", arch=arch, rope_parameters=rope, max_position_embeddings=24, seed=7)
    model = ours(path)
    assert model.config.rope.rope_type == rope["rope_type"]
    if variant != "dynamic":  # the rotation really differs from unscaled RoPE
        assert not torch.allclose(model.rotary.inv_freq, RotaryEmbedding(parse_rope_config({}, 16)).inv_freq) or \
            model.rotary.attention_scaling != 1.0
    torch.testing.assert_close(run_sequence(model, PROMPT), hf_logits(path, PROMPT), atol=1e-4, rtol=0)


def test_old_rope_scaling_form_parses_like_rope_parameters(tmp_path):
    """transformers 4 configs: `rope_scaling` with 'type' or 'rope_type' and a top-level rope_theta."""
    path = tiny_checkpoint(tmp_path / "m", arch="llama", max_position_embeddings=24,
                           rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 500.0,
                                            "original_max_position_embeddings": 32})
    new = ModelConfig.from_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.update(rope_theta=500.0, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    (path / "config.json").write_text(json.dumps(cfg))
    old = ModelConfig.from_pretrained(path)
    assert old.rope == new.rope
    # transformers reads the old form too; the logits still agree
    torch.testing.assert_close(run_sequence(ours(path), PROMPT), hf_logits(path, PROMPT), atol=1e-4, rtol=0)


def test_rope_config_errors():
    with pytest.raises(ModelLoadError, match="unsupported RoPE scaling type 'longrope'"):
        parse_rope_config({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, 64)
    with pytest.raises(ModelLoadError, match="needs 'factor'"):
        parse_rope_config({"rope_parameters": {"rope_type": "linear"}}, 64)
    with pytest.raises(ModelLoadError, match="high_freq_factor"):
        parse_rope_config({"rope_parameters": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                                               "high_freq_factor": 1}}, 64)


def test_rope_far_positions_keep_relative_rotation():
    """Scores depend only on the distance between positions, even 10M tokens in (float32 angles would drift)."""
    rope = RotaryEmbedding(parse_rope_config({"rope_theta": 1e6}, 64))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 64, generator=gen), torch.randn(1, 1, 64, generator=gen)

    def score(pq, pk):
        cq, sq = rope.cos_sin(torch.tensor([pq]))
        ck, sk = rope.cos_sin(torch.tensor([pk]))
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    for offset in (10_000_000, 33_554_433, 100_000_007):  # beyond 2^24 and 2^25: odd positions unrepresentable in fp32
        assert score(offset + 5, offset) == pytest.approx(score(5, 0), abs=1e-4)
    # and the angle itself is the exact product position * inv_freq (reduced mod 2 pi in float64)
    pos = 10_000_003
    cos, sin = rope.cos_sin(torch.tensor([pos]))
    for i in (0, 7, 31):
        theta = pos * float(rope.inv_freq[i])
        assert float(cos[0, i]) == pytest.approx(math.cos(theta), abs=1e-6)
        assert float(sin[0, i]) == pytest.approx(math.sin(theta), abs=1e-6)


def test_dynamic_rope_is_per_sequence_in_a_batch(tmp_path):
    """Two sequences of different lengths in one step: each gets the result it gets alone."""
    path = tiny_checkpoint(tmp_path / "m", arch="llama", max_position_embeddings=16,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1000.0})
    model = ours(path)
    a, b = PROMPT[:40], PROMPT[5:15]
    alone = [run_sequence(model, a, block_size=4), run_sequence(model, b, block_size=4)]
    backend = build_backend("dense", model.config.num_layers, impl="torch")
    from longserve.engine.testing import make_caches
    bs = 4
    caches = make_caches(model.config, 20, bs)
    meta = AttentionMetadata.for_step([list(range(0, 10)), list(range(10, 13))], [40, 10], [40, 10], bs)
    with torch.inference_mode():
        hidden = model(torch.tensor(a + b), meta.positions, caches, meta, backend, StepState())
        logits = model.compute_logits(hidden)
    torch.testing.assert_close(logits[:40], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[40:], alone[1], atol=1e-5, rtol=0)


def test_sharded_checkpoint_and_bfloat16(tmp_path):
    path = tiny_checkpoint(tmp_path / "m", arch="qwen2")
    model = hf_model(path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    (tmp_path / "sharded" / "tokenizer.json").write_text((path / "tokenizer.json").read_text())
    (tmp_path / "sharded" / "tokenizer_config.json").write_text((path / "tokenizer_config.json").read_text())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    loaded = load_model(tmp_path / "sharded", "cpu", "auto")
    assert loaded.model.embed_tokens.dtype == torch.float32  # auto on CPU
    want = hf_logits(path, PROMPT[:16])
    torch.testing.assert_close(run_sequence(loaded.model, PROMPT[:16]), want, atol=1e-4, rtol=0)
    bf16 = ours(tmp_path / "sharded", dtype="bfloat16")
    assert bf16.embed_tokens.dtype == torch.bfloat16
    got = run_sequence(bf16, PROMPT[:16])
    assert got.dtype == torch.float32 and (got - want).abs().max() < 0.1
    bf16.to(torch.float16)
    assert bf16.rotary.inv_freq.dtype == torch.float32  # casting the model never rounds the RoPE frequencies


def test_model_info_and_config_fields(tmp_path):
    path = tiny_checkpoint(tmp_path / "a", arch="qwen3", num_hidden_layers=3)
    loaded = load_model(path, "cpu", "float32")
    c = loaded.config
    info = c.model_info()
    assert {k: info[k] for k in ("architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim")} == {
        "architecture": "Qwen3ForCausalLM", "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    assert c.qk_norm and not c.attention_bias and c.eos_token_ids == [2] and c.vocab_size == 259
    assert loaded.path == path.resolve() and resolve_model_path(str(path)) == path.resolve()
    assert loaded.tokenizer.eos_token_id == 2 and loaded.tokenizer.chat_template
    other = tiny_checkpoint(tmp_path / "b", arch="qwen3", num_hidden_layers=3, seed=9)
    assert ModelConfig.from_pretrained(other).fingerprint() == c.fingerprint()  # weights do not matter
    wider = tiny_checkpoint(tmp_path / "c", arch="qwen3", num_hidden_layers=3, intermediate_size=96)
    assert ModelConfig.from_pretrained(wider).fingerprint() != c.fingerprint()
    assert resolve_dtype("auto", c, torch.device("cpu")) == torch.float32
    # tiny checkpoints are saved in fp32: served in bf16 on CUDA (docs/models.md, "dtype")
    assert resolve_dtype("auto", c, torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int3", c, torch.device("cpu"))


def test_mistral_sliding_window_caps_context(tmp_path):
    path = tiny_checkpoint(tmp_path / "m", arch="mistral", sliding_window=32)
    model = ours(path)
    assert model.config.sliding_window == 32 and model.config.max_position_embeddings == 32
    torch.testing.assert_close(run_sequence(model, PROMPT[:30]), hf_logits(path, PROMPT[:30]), atol=1e-4, rtol=0)


def test_tiny_checkpoint_is_deterministic(tmp_path):
    a = tiny_checkpoint(tmp_path / "a", arch="llama", seed=4)
    b = tiny_checkpoint(tmp_path / "b", arch="llama", seed=4)
    c = tiny_checkpoint(tmp_path / "c", arch="llama", seed=5)
    read = lambda p: (p / "model.safetensors").read_bytes()  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)
    assert tiny_config_dict("qwen3", hidden_size=32)["hidden_size"] == 32
    with pytest.raises(ValueError, match="arch must be one of"):
        tiny_config_dict("gpt2")


# -- loader errors ---------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path / "ckpt", arch="llama")


def rewrite_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_path_and_files(tmp_path, ckpt):
    with pytest.raises(ModelLoadError, match="not found.*config.json"):
        load_model(tmp_path / "nowhere", "cpu", "float32")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        load_model(tmp_path / "file", "cpu", "float32")
    (ckpt / "config.json").rename(ckpt / "config.bak")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(ckpt, "cpu", "float32")
    (ckpt / "config.bak").rename(ckpt / "config.json")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read .*config.json"):
        load_model(ckpt, "cpu", "float32")


def test_unsupported_architecture_lists_supported(ckpt):
    rewrite_config(ckpt, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelLoadError, match="unsupported architecture GPT2LMHeadModel.*LlamaForCausalLM.*"
                                             "Qwen3ForCausalLM"):
        load_model(ckpt, "cpu", "float32")


def test_pickled_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*safetensors are needed"):
        load_model(ckpt, "cpu", "float32")
    (ckpt / "pytorch_model.bin").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(ckpt, "cpu", "float32")


def test_missing_and_mismatched_tensors_are_named(tmp_path, ckpt):
    from safetensors.torch import load_file, save_file
    tensors = load_file(ckpt / "model.safetensors")
    dropped = {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(dropped, ckpt / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="lacks tensors model.layers.1.mlp.up_proj.weight"):
        load_model(ckpt, "cpu", "float32")
    save_file({**tensors, "model.layers.0.self_attn.q_proj.weight": torch.zeros(3, 64)}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"q_proj.weight' has shape \(3, 64\).*\(64, 64\)"):
        load_model(ckpt, "cpu", "float32")
    save_file({**tensors, "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}, ckpt / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        load_model(ckpt, "cpu", "float32")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    rewrite_config(ckpt, num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match="lacks tensors model.layers.2"):
        load_model(ckpt, "cpu", "float32")


def test_missing_tokenizer(ckpt):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        load_model(ckpt, "cpu", "float32")
    assert load_model(ckpt, "cpu", "float32", tokenizer=False).tokenizer is None


def test_bad_config_values(ckpt):
    rewrite_config(ckpt, hidden_act="gelu")
    with pytest.raises(ModelLoadError, match="hidden_act='gelu'"):
        load_model(ckpt, "cpu", "float32")
    rewrite_config(ckpt, hidden_act="silu", num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="not a multiple of num_key_value_heads=3"):
        load_model(ckpt, "cpu", "float32")
    rewrite_config(ckpt, num_key_value_heads=2, vocab_size=None)
    with pytest.raises(ModelLoadError, match="no 'vocab_size'"):
        load_model(ckpt, "cpu", "float32")


def test_decoder_model_builds_from_config_alone():
    cfg = ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], **tiny_config_dict("qwen2")})
    model = DecoderModel(cfg)
    assert cfg.attention_bias and not cfg.o_proj_bias and model.layers[0].qkv_proj.bias.shape == (128,)
    assert sum(p.numel() for p in model.parameters()) == sum(
        math.prod(s) for s in model.checkpoint_tensor_shapes().values())

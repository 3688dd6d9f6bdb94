"""Policy files (kernels/plan.py): round trip, and a clear one-line error for each kind of bad policy."""

from __future__ import annotations

import json
import re

import pytest

from longserve.kernels.base import BackendError
from longserve.kernels.plan import AttentionPlan, LayerPlan
from longserve.kernels.registry import build_backend

MODEL = {"architecture": "LlamaForCausalLM", "num_layers": 4, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
         "fingerprint": "abc123"}


def policy(layers=None, **over):
    data = {"format": "longserve-policy/1", "method": "hylra", "params": {"topk_tokens": 1024},
            "model": dict(MODEL),
            "layers": layers if layers is not None else [
                {"mode": "full"}, {"mode": "compute"}, {"mode": "reuse", "source": 1}, {"mode": "compute"}],
            "profile": {"dp": {"min_overlap": 0.8}}}
    data.update(over)
    return data


def write(tmp_path, data):
    path = tmp_path / "policy.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def load_error(tmp_path, data, model_info=None) -> str:
    with pytest.raises(BackendError) as info:
        plan = AttentionPlan.load(write(tmp_path, data))
        plan.check_model(model_info or MODEL)
        build_backend(plan=plan, impl="torch")
    msg = str(info.value)
    assert "\n" not in msg and msg  # one line
    return msg


def test_valid_policy_round_trips_and_builds(tmp_path):
    plan = AttentionPlan.load(write(tmp_path, policy()))
    plan.check_model(MODEL)
    assert plan.layers == [LayerPlan("full"), LayerPlan("compute"), LayerPlan("reuse", 1), LayerPlan("compute")]
    assert plan.params == {"topk_tokens": 1024} and plan.profile == {"dp": {"min_overlap": 0.8}}
    backend = build_backend(plan=plan, impl="torch")
    assert backend.method.params["topk_tokens"] == 1024 and backend.method.params["sink_blocks"] == 1
    plan.save(tmp_path / "again.json")
    assert AttentionPlan.load(tmp_path / "again.json").to_json() == plan.to_json()


@pytest.mark.parametrize("model_info,match", [
    ({**MODEL, "num_layers": 5}, "num_layers=4 .* num_layers=5"),
    ({**MODEL, "architecture": "Qwen2ForCausalLM"}, "architecture='LlamaForCausalLM'"),
    ({**MODEL, "num_kv_heads": 1}, "num_kv_heads"),
    ({**MODEL, "head_dim": 128}, "head_dim"),
])
def test_policy_for_another_model(tmp_path, model_info, match):
    assert re.search(match, load_error(tmp_path, policy(), model_info))


def test_wrong_layer_count_without_model_info(tmp_path):
    data = policy(model={})
    msg = load_error(tmp_path, data, {"num_layers": 6})
    assert msg == "policy has 4 layers but the model has 6"


@pytest.mark.parametrize("layers,match", [
    ([{"mode": "compute"}, {"mode": "reuse", "source": 2}, {"mode": "compute"}, {"mode": "full"}],
     "layer 1: reuse source 2 must be an earlier layer"),
    ([{"mode": "compute"}, {"mode": "reuse", "source": 1}, {"mode": "full"}, {"mode": "full"}],
     "layer 1: reuse source 1 must be an earlier layer"),
    ([{"mode": "full"}, {"mode": "reuse", "source": 0}, {"mode": "compute"}, {"mode": "full"}],
     "reuse source 0 is a 'full' layer"),
    ([{"mode": "compute"}, {"mode": "reuse", "source": 0}, {"mode": "reuse", "source": 1}, {"mode": "full"}],
     "reuse source 1 is a 'reuse' layer"),
    ([{"mode": "full"}, {"mode": "reuse"}, {"mode": "full"}, {"mode": "full"}],
     "layer 1: mode 'reuse' needs a 'source'"),
    ([{"mode": "full"}, {"mode": "reuse", "source": -1}, {"mode": "full"}, {"mode": "full"}],
     "must be an earlier layer"),
    ([{"mode": "full"}, {"mode": "reuse", "source": "0"}, {"mode": "full"}, {"mode": "full"}],
     "'source' must be an integer"),
    ([{"mode": "compute"}, {"mode": "compute", "source": 0}, {"mode": "full"}, {"mode": "full"}],
     "'source' is only allowed with mode 'reuse'"),
    ([{"mode": "full"}, {"mode": "sparse"}, {"mode": "full"}, {"mode": "full"}], "unknown mode 'sparse'"),
    ([{"mode": "full"}, "compute", {"mode": "full"}, {"mode": "full"}], "layer 1: expected an object"),
    ([], "non-empty 'layers'"),
])
def test_bad_layers(tmp_path, layers, match):
    assert match in load_error(tmp_path, policy(layers))


@pytest.mark.parametrize("text,match", [
    ('{"format": "longserve-policy/1", "layers": [', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps(policy(format="longserve-policy/9")), "format 'longserve-policy/9'"),
    (json.dumps(policy(method=3)), "string 'method'"),
    (json.dumps(policy(method="nope")), "unknown attention method 'nope'"),
    (json.dumps(policy(method="dense")), "a 'compute' layer needs a sparse method"),
    (json.dumps(policy(params=[1])), "'params' must be an object"),
    (json.dumps(policy(params={"topk_tokens": -5})), "hylra: topk_tokens must be an integer >= 1"),
    (json.dumps(policy(params={"top_k": 5})), "hylra: unknown parameter 'top_k'"),
])
def test_bad_file_contents(tmp_path, text, match):
    assert match in load_error(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(BackendError, match="policy file not found"):
        AttentionPlan.load(tmp_path / "nope.json")


# ---------------------------------------------------------------- `longserve profile` on a tiny checkpoint

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from longserve.engine.testing import tiny_checkpoint  # noqa: E402
from longserve.policies import cli as profile_cli  # noqa: E402
from longserve.policies.profiler import ProfileConfig, ProfileError, build_policy  # noqa: E402

CALIB = ("It was a bright cold day in spring, and the clocks in the old tower were striking the hours one after "
         "another while the river went on under the bridge as it always had. ")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", arch="llama", num_hidden_layers=5)


def run_profile(*argv) -> int:
    parser = argparse.ArgumentParser(prog="longserve")
    profile_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", *argv])
    return args.func(args)


def test_profile_tiny_checkpoint_writes_a_policy_that_serves(tiny, tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB * 8)  # byte-level tokenizer: ~1200 tokens
    out, plots = tmp_path / "policy.json", tmp_path / "plots"
    rc = run_profile("--model", str(tiny), "--calib", str(calib), "--out", str(out), "--topk-tokens", "128",
                     "--block-size", "16", "--full-layers", "1", "--max-compute-layers", "2", "--probe-every", "8",
                     "--chunk-tokens", "300", "--plots", str(plots), "--device", "cpu", "--quiet")
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "policy written to" in printed

    from longserve.engine.loader import load_model
    info = load_model(str(tiny), "cpu", "float32", tokenizer=False).config.model_info()
    plan = AttentionPlan.load(out)
    plan.check_model(info)
    assert plan.model == info  # the policy names the model it was made for, fingerprint included
    assert plan.method == "hylra" and plan.params["topk_tokens"] == 128
    modes = [lp.mode for lp in plan.layers]
    assert modes.count("full") == 1 and 1 <= modes.count("compute") <= 2
    prof = plan.profile
    assert prof["num_probes"] > 0 and prof["calibration"]["tokens"] == len((CALIB * 8).encode())
    overlap = np.array(prof["overlap"])
    assert overlap.shape == (5, 5) and np.allclose(np.diag(overlap), 1.0)
    assert ((overlap >= 0) & (overlap <= 1)).all() and overlap.min() < 1.0
    assert len(prof["sensitivity"]["topk_error"]) == 5 and max(prof["sensitivity"]["topk_error"]) > 0
    # The FULL layer is the one losing most under the budget.
    assert prof["full_layers"] == [int(np.argmax(prof["sensitivity"]["topk_error"]))]
    for name in ("overlap.png", "sensitivity.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The policy serves requests through the engine (hylra on the non-full layers).
    from longserve.engine import LLM, SamplingParams
    llm = LLM(model=str(tiny), policy=str(out), device="cpu", dtype="float32", block_size=16, num_kv_blocks=256)
    result = llm.generate(CALIB * 2, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert len(result[0].outputs[0].token_ids) == 5


def test_profile_errors_are_one_line(tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    out = tmp_path / "p.json"
    assert run_profile("--model", str(tiny), "--calib", str(short), "--out", str(out), "--topk-tokens", "64",
                       "--device", "cpu", "--quiet") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longserve profile: error: calibration text too short") and "\n" not in err
    assert run_profile("--model", str(tiny), "--calib", str(tmp_path / "none.txt"), "--out", str(out),
                       "--device", "cpu", "--quiet") == 2
    assert "calibration file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{oops\n')
    assert run_profile("--model", str(tiny), "--calib", str(bad), "--out", str(out), "--device", "cpu",
                       "--quiet") == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):  # argparse: the two ways to choose FULL layers exclude each other
        run_profile("--calib", "x", "--out", "y", "--full-layers", "2", "--sparsity", "0.5")
    assert "not allowed with argument" in capsys.readouterr().err


def test_build_policy_full_layers_by_sparsity_and_dp():
    rng = np.random.default_rng(0)
    n = 8
    overlap = rng.uniform(0.3, 0.9, (n, n))
    np.fill_diagonal(overlap, 1.0)
    err = rng.uniform(0, 1, (n, 2))
    results = {"overlap": overlap, "overlap_mean_heads": overlap, "mass_share": rng.uniform(0, 1, (n, 2)),
               "topk_error": err, "num_probes": 10}
    plan = build_policy(results, ProfileConfig(sparsity=0.75, max_compute_layers=3), {"num_layers": n})
    full = sorted(np.argsort(-err.mean(1))[:2].tolist())  # ceil(8 * 0.25) = 2 most sensitive
    assert [i for i, lp in enumerate(plan.layers) if lp.mode == "full"] == full
    assert sum(lp.mode == "compute" for lp in plan.layers) <= 3
    assert plan.profile["dp"]["min_overlap"] == pytest.approx(dp_min(plan, overlap), abs=1e-4)
    with pytest.raises(ProfileError, match="either --full-layers or --sparsity"):
        ProfileConfig(full_layers=1, sparsity=0.5).validate()


def dp_min(plan, overlap):
    vals = [1.0 if lp.mode == "compute" else overlap[i][lp.source] for i, lp in enumerate(plan.layers)
            if lp.mode != "full"]
    return min(vals)


# ---------------------------------------------------------------- the default model (real weights, real text)

from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "policies" / "smollm2-135m-instruct.hylra.json"
CALIB_FILE = REPO / "policies" / "calib" / "python-reference.txt"


def default_model_info():
    from longserve.engine.loader import resolve_model_path
    from longserve.engine.models.decoder import ModelConfig
    return ModelConfig.from_pretrained(resolve_model_path(None)).model_info()


def test_shipped_policy_fits_the_default_model():
    plan = AttentionPlan.load(SHIPPED)
    plan.check_model(default_model_info())
    assert plan.model["fingerprint"] == default_model_info()["fingerprint"]
    assert plan.method == "hylra" and plan.params["topk_tokens"] == 2048
    modes = [lp.mode for lp in plan.layers]
    assert modes.count("full") == 2 and modes.count("reuse") > 0
    assert plan.profile["calibration"]["file"] == CALIB_FILE.name
    import hashlib
    assert plan.profile["calibration"]["sha256"] == hashlib.sha256(CALIB_FILE.read_bytes()).hexdigest()
    from importlib import resources
    assert (resources.files("longserve.policies") / SHIPPED.name).is_file()  # shipped as package data


@pytest.mark.slow
def test_profile_default_model_on_english_text_then_serve(tmp_path, capsys):
    """`longserve profile` on the default model with ~3000 tokens of real English text (the Python language
    reference), then the policy serves a request (measured: docs/policies.md)."""
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_FILE.read_text()[:13000])
    out = tmp_path / "policy.json"
    rc = run_profile("--calib", str(calib), "--out", str(out), "--topk-tokens", "512", "--device", "cpu", "--quiet")
    assert rc == 0, capsys.readouterr().err
    plan = AttentionPlan.load(out)
    plan.check_model(default_model_info())
    assert 2500 <= plan.profile["calibration"]["tokens"] <= 3500 and plan.profile["num_probes"] > 50
    from longserve.engine import LLM, SamplingParams
    llm = LLM(policy=str(out), device="cpu", dtype="float32", num_kv_blocks=256, max_num_batched_tokens=512)
    prompt = CALIB_FILE.read_text()[13000:19000]  # ~1400 tokens, longer than the 512-token budget
    result = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0.0))
    assert result[0].outputs[0].token_ids


def test_evaluate_policy_against_dense(tiny):
    from longserve.engine.loader import load_model
    from longserve.policies.evaluate import cut_points, evaluate
    loaded = load_model(str(tiny), "cpu", "float32")
    ids = list((CALIB * 3).encode())[:400]
    layers = [LayerPlan("full"), LayerPlan("compute"), LayerPlan("reuse", 1), LayerPlan("compute"),
              LayerPlan("reuse", 3)]
    info = loaded.config.model_info()
    covering = AttentionPlan("hylra", layers, {"topk_tokens": 4096}, info)
    r = evaluate(loaded, covering, ids, block_size=16, chunk=64, gen_tokens=4, gen_points=3, impl="torch")
    assert r["hylra_ppl"] == r["dense_ppl"] and r["next_token_agreement_tail"] is None  # budget covers all
    assert r["greedy_agreement"] == 1.0 and r["greedy_identical_share"] == 1.0 and r["greedy_points"] == [400]
    sparse = AttentionPlan("hylra", layers, {"topk_tokens": 48, "recent_blocks": 1, "prefill": "sparse"}, info)
    r = evaluate(loaded, sparse, ids, block_size=16, chunk=64, gen_tokens=4, gen_points=3, impl="torch")
    assert r["greedy_points"] == [96, 248, 400] and r["tail_from"] == 96
    assert r["hylra_ppl"] != r["dense_ppl"] and 0.0 <= r["next_token_agreement_tail"] <= 1.0
    assert r["policy_layers"] == {"full": 1, "compute": 2, "reuse": 2}
    assert cut_points(100, 20, 5) == [20, 40, 60, 80, 100]

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
    (json.dumps(policy(method="dense")), "a dense plan can only contain 'full' layers"),
    (json.dumps(policy(params=[1])), "'params' must be an object"),
    (json.dumps(policy(params={"topk_tokens": -5})), "hylra: topk_tokens must be an integer >= 1"),
    (json.dumps(policy(params={"top_k": 5})), "unknown parameter(s) top_k"),
])
def test_bad_file_contents(tmp_path, text, match):
    assert match in load_error(tmp_path, text)


def test_missing_file(tmp_path):
    with pytest.raises(BackendError, match="policy file not found"):
        AttentionPlan.load(tmp_path / "nope.json")

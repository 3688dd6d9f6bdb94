"""Bad plugin configuration fails while vLLM builds its configuration (before any model is loaded or any worker
starts), with one line naming the problem."""

from __future__ import annotations

import json

import pytest

from longserve.kernels.base import BackendError
from longserve.kernels.plan import AttentionPlan, LayerPlan
from longserve.vllm_plugin.config import check_local_layers, check_stages

from conftest import HYLRA_LAYERS, METHOD_PARAMS


def _start(model: str, section, **options):
    from vllm import LLM

    extra = {"additional_config": {"longserve": section}} if section is not None else {}
    return LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, **extra, **options)


def _policy(tmp_path, **model) -> str:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"format": "longserve-policy/1", "method": "hylra", "params": METHOD_PARAMS["hylra"],
                                "model": model, "layers": HYLRA_LAYERS}))
    return str(path)


@pytest.mark.parametrize("section, problem", [
    ({"attention": "sparse-magic"}, "unknown attention method 'sparse-magic'"),
    ({"attention": "hylra", "attention_config": {"topk": 5}}, "hylra: unknown parameter"),
    ({"attention": "superlinear", "attention_config": {"num_spans": 0}}, "num_spans must be an integer >= 1"),
    ({"attention": "superlinear", "attention_config": {"sw_index": 3}}, "needs a window of at least block_size - 1 = 127"),
    ({"attention": "hylra", "window": 3}, "unknown key(s) window"),
    ({"policy": "/nonexistent/policy.json"}, "policy file not found"),
])
def test_bad_section_refused_at_startup(checkpoints, section, problem):
    with pytest.raises(BackendError) as info:
        _start(checkpoints["llama"], section, attention_backend="CUSTOM")
    message = str(info.value)
    assert problem in message and message.startswith("longserve: ") and "\n" not in message


def test_policy_for_another_model_refused(checkpoints, tmp_path):
    policy = _policy(tmp_path, architecture="LlamaForCausalLM", num_heads=9)
    with pytest.raises(BackendError, match=r"^longserve: policy was made for num_heads=9 but the model has num_heads=4$"):
        _start(checkpoints["llama"], {"policy": policy}, attention_backend="CUSTOM")
    with pytest.raises(BackendError, match="architecture='LlamaForCausalLM' but the model has architecture='Qwen2"):
        _start(checkpoints["qwen2"], {"policy": _policy(tmp_path, architecture="LlamaForCausalLM")},
               attention_backend="CUSTOM")


def test_section_without_custom_backend_refused(checkpoints):
    with pytest.raises(BackendError, match="attention backend is not CUSTOM"):
        _start(checkpoints["llama"], {"attention": "hylra"})


def test_reuse_across_pipeline_stages_refused(checkpoints, tmp_path):
    """4 layers on 2 stages: layers 0-1 and 2-3; the policy's layer 2 reuses layer 1."""
    with pytest.raises(BackendError, match="layer 2 reuses layer 1's selection, but layer 1 runs on pipeline stage 0"):
        _start(checkpoints["llama"], {"policy": _policy(tmp_path)}, attention_backend="CUSTOM",
               pipeline_parallel_size=2)


def test_stage_checks():
    plan = AttentionPlan("hylra", [LayerPlan("compute"), LayerPlan("reuse", 0), LayerPlan("compute"),
                                   LayerPlan("reuse", 2)])
    check_stages(plan, [(0, 2), (2, 4)])  # every reuse layer sits with its source
    with pytest.raises(BackendError, match="layer 3 reuses layer 2's selection, but layer 2 runs on pipeline stage 0"):
        check_stages(plan, [(0, 3), (3, 4)])
    check_local_layers(plan, [2, 3])
    with pytest.raises(BackendError, match="layer 1 reuses layer 0's selection, but layer 0 is not on this worker's pipeline stage"):
        check_local_layers(plan, [1, 2, 3])

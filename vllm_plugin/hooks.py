"""The plugin's hooks on vLLM 0.32 (installed once per process by register())."""

from __future__ import annotations

from typing import Any

from ..kernels.base import BackendError
from .config import SECTION, build_from_section, check_stages

BACKEND_CLASS = "longserve.vllm_plugin.backend.LongserveAttentionBackend"

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    platform = type(current_platform)
    platform_check = platform.check_and_update_config.__func__
    create_engine_config = EngineArgs.create_engine_config
    refused: list[BackendError] = []

    def check_and_update_config(cls, vllm_config) -> None:
        platform_check(cls, vllm_config)
        try:
            validate(vllm_config)
        except BackendError as e:
            refused.append(e)
            raise

    def create_engine_config_hook(self, *args, **kwargs):
        # vLLM's config class (pydantic) wraps errors in a multi-line report: surface ours as the one line it is.
        refused.clear()
        try:
            return create_engine_config(self, *args, **kwargs)
        except Exception:
            if refused:
                raise refused[-1] from None
            raise

    platform.check_and_update_config = classmethod(check_and_update_config)
    EngineArgs.create_engine_config = create_engine_config_hook

    if current_platform.is_cpu():
        # vLLM's CPU platform answers every selection with its own CPU attention.
        platform_select = platform.get_attn_backend_cls.__func__

        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            if _custom_is_longserve(selected_backend) and not attn_selector_config.use_mla:
                return BACKEND_CLASS
            return platform_select(cls, selected_backend, attn_selector_config, num_heads)

        platform.get_attn_backend_cls = classmethod(get_attn_backend_cls)

    update_states = GPUModelRunner._update_states
    build_attention_metadata = GPUModelRunner._build_attention_metadata
    dummy_run = GPUModelRunner._dummy_run

    def _update_states_hook(self, scheduler_output):
        if scheduler_output.finished_req_ids:
            for runtime in _runtimes(self):
                runtime.finish(list(scheduler_output.finished_req_ids))
        return update_states(self, scheduler_output)

    def _build_attention_metadata_hook(self, *args, **kwargs):
        # A dummy run's rows belong to no request (whatever the input batch holds at the time).
        rows = [] if getattr(self, "_longserve_dummy_run", False) else self.input_batch.req_ids
        for runtime in _runtimes(self):
            runtime.set_step_requests(rows)
        return build_attention_metadata(self, *args, **kwargs)

    def _dummy_run_hook(self, *args, **kwargs):
        self._longserve_dummy_run = True
        try:
            return dummy_run(self, *args, **kwargs)
        finally:
            self._longserve_dummy_run = False

    GPUModelRunner._update_states = _update_states_hook
    GPUModelRunner._build_attention_metadata = _build_attention_metadata_hook
    GPUModelRunner._dummy_run = _dummy_run_hook


def _custom_is_longserve(selected_backend: Any) -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return selected_backend == AttentionBackendEnum.CUSTOM and AttentionBackendEnum.CUSTOM.is_overridden() \
        and AttentionBackendEnum.CUSTOM.get_path() == BACKEND_CLASS


def _runtimes(runner) -> list:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention import Attention

    found = {}
    for layer in get_layers_from_vllm_config(runner.vllm_config, Attention).values():
        runtime = getattr(layer.impl, "runtime", None)
        if runtime is not None:
            found[id(runtime)] = runtime
    return list(found.values())


def validate(vllm_config) -> None:
    """Check additional_config["longserve"] against the model and the pipeline split; one line on failure."""
    extra = vllm_config.additional_config if isinstance(vllm_config.additional_config, dict) else {}
    selected = _custom_is_longserve(vllm_config.attention_config.backend)
    if SECTION in extra and not selected:
        raise BackendError(f"longserve: additional_config.{SECTION} is set but the attention backend is not CUSTOM "
                           "(add --attention-backend CUSTOM, or attention_backend='CUSTOM')")
    if not selected or vllm_config.model_config is None:
        return
    import torch
    from vllm.distributed.utils import get_pp_indices
    from vllm.platforms import current_platform

    from .backend import model_info, worker_setup

    info = model_info(vllm_config)
    device = torch.device("cuda" if current_platform.is_cuda_alike() else current_platform.device_type)
    backend = build_from_section(extra.get(SECTION), info, worker_setup(vllm_config, device))
    stages = vllm_config.parallel_config.pipeline_parallel_size
    if stages > 1:
        check_stages(backend.plan, [get_pp_indices(info["num_layers"], r, stages) for r in range(stages)])

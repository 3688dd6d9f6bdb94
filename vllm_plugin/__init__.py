"""longserve's attention backends inside vLLM: a plugin loaded through vLLM's `vllm.general_plugins` entry point.

register() (called by vLLM in every process it starts) makes longserve vLLM's CUSTOM attention backend and
installs three small hooks on vLLM 0.32 (see docs/vllm.md):
- configuration: when vLLM builds its config, additional_config["longserve"] is checked (methods, parameters,
  policy against the model, pipeline split) so a bad one fails at start-up with one line;
- CPU platform: vLLM's CPU platform always picks its own attention; with CUSTOM selected it returns ours;
- model runner: each step's request ids (in batch order) and finished requests reach the backend, which keeps
  per-sequence state (routing's cluster tables) by request.
"""

from __future__ import annotations



def register() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import hooks

    register_backend(AttentionBackendEnum.CUSTOM, hooks.BACKEND_CLASS)
    hooks.install()

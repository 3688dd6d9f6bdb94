"""A setting a backend cannot serve fails when the engine is built (LLM(...), `longserve generate`,
`longserve serve`), in one line, never inside the first step."""

import pytest

from longserve.engine import LLM, EngineError
from longserve.engine.testing import tiny_checkpoint
from longserve.server import app as server_app
from longserve.server.cli import main

# superlinear's summary search needs a window of at least block_size - 1 keys; sw_index 2 gives 8 < 15.
NARROW_WINDOW = '{"sw_index": 2}'


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


def build(ckpt, **kw):
    return LLM(model=str(ckpt), device="cpu", dtype="float32", num_kv_blocks=64, **kw)


def test_superlinear_window_narrower_than_a_block_fails_at_build(ckpt):
    with pytest.raises(EngineError, match="window of at least block_size - 1 = 15"):
        build(ckpt, attention="superlinear", attention_config={"sw_index": 2}, block_size=16)
    build(ckpt, attention="superlinear", attention_config={"sw_index": 2}, block_size=8)  # 8 >= 7: fine


@pytest.mark.parametrize("method", ["dense", "superlinear", "hylra", "routing"])
def test_forced_triton_without_cuda_fails_at_build(ckpt, method, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the suite runs Triton in the interpreter
    with pytest.raises(EngineError, match="impl 'triton' needs a CUDA device but the engine runs on cpu"):
        build(ckpt, attention=method, attention_impl="triton", block_size=16)


def test_hylra_triton_block_size_fails_at_build(ckpt, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # so that only the block size is wrong
    with pytest.raises(EngineError, match="power-of-two block size >= 16, got 8"):
        build(ckpt, attention="hylra", attention_impl="triton", block_size=8)


def test_cli_generate_and_serve_exit_at_start_with_one_line(ckpt, capsys, monkeypatch):
    def never_listen(*args, **kwargs):
        raise AssertionError("the server started listening with a setting the backend cannot serve")

    monkeypatch.setattr(server_app, "_server_class", lambda: never_listen)
    engine_args = ["--model", str(ckpt), "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "64",
                   "--attention", "superlinear", "--attention-config", NARROW_WINDOW, "--block-size", "16"]
    for argv in (["generate", "--prompt", "hello", "--max-tokens", "2"], ["serve", "--port", "1"]):
        assert main(argv + engine_args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"longserve {argv[0]}: error: superlinear: summary search"), err

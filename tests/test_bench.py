"""`longserve bench throughput` and `longserve bench serve`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from longserve.bench import throughput as tp
from longserve.bench.cli import parse_size
from longserve.bench.common import format_tokens
from longserve.bench.presets import PRESETS, preset_config, random_model, weight_count
from longserve.kernels.base import AttentionMetadata, StepState
from longserve.kernels.registry import METHODS
from longserve.server.cli import main

ROOT = Path(__file__).resolve().parents[1]
SPARSE = [m for m in METHODS if m != "dense"]


def available_methods() -> list[str]:
    backends, _ = tp.build_backends(list(METHODS), 2, {}, "auto")
    return list(backends)


def read_png(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(str(path))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    return image


def check_report(report: dict, methods: list[str], contexts: list[int], batches: list[int], cfg) -> None:
    assert report["kv_mode"] in ("synthetic", "prefill")
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["command"].startswith("longserve") and report["argv"]
    assert report["methods"] == methods
    rows = {(r["context"], r["batch"], r["method"]): r for r in report["results"]}
    assert len(rows) == len(report["results"]) == len(methods) * len(contexts) * len(batches)
    bs = report["block_size"]
    for context in contexts:
        for batch in batches:
            for method in methods:
                r = rows[(context, batch, method)]
                assert "error" not in r, r
                assert 0 < r["decode_ms_min"] <= r["decode_ms_per_step"] <= r["decode_ms_max"]
                assert r["decode_ms_min"] <= r["decode_ms_mean"] <= r["decode_ms_max"]
                assert r["decode_tok_s"] == pytest.approx(batch * 1000 / r["decode_ms_per_step"])
                assert 0.0 <= r["attention_share"] <= 1.0
                assert r["non_attention_ms_per_step"] > 0
                assert r["peak_memory_bytes"] > 0
                # K and V of every layer over the context's blocks plus each sequence's private blocks.
                blocks = context // bs + max(batches) * -(-(report["warmup_steps"] + report["decode_steps"]) // bs) \
                    + -(-report["prefill_tokens"] // bs)
                assert r["kv_cache_bytes"] == 2 * cfg.num_layers * blocks * bs * cfg.num_kv_heads * cfg.head_dim * 4
                assert r["decode_speedup_vs_dense"] == pytest.approx(
                    rows[(context, batch, "dense")]["decode_ms_per_step"] / r["decode_ms_per_step"])
            assert rows[(context, batch, "dense")]["aux_bytes"] == 0


# ----------------------------------------------------------------------------------------------- throughput

def test_throughput_small_context_every_method(tmp_path, capsys):
    methods = available_methods()
    assert "dense" in methods
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    # Small budgets, so every sparse method selects (rather than seeing everything) at these short contexts.
    small = {"superlinear": {"sw_index": 15}, "hylra": {"topk_tokens": 256},
             "routing": {"segment_tokens": 512, "budget_tokens": 256, "window": 128}}
    rc = main(["bench", "throughput", "--model", "tiny", "--context", "2K,4K", "--attention", ",".join(METHODS),
               "--attention-config", json.dumps(small), "--decode-steps", "1", "--batch", "1,2",
               "--prefill-tokens", "48", "--prefill-chunk", "32", "--device", "cpu", "--json", str(out_json),
               "--plot", str(out_png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out_json.read_text())
    check_report(report, methods, [2048, 4096], [1, 2], preset_config("tiny"))
    assert report["attention_config"] == small
    assert set(report["unavailable"]) == set(METHODS) - set(methods)
    for r in report["results"]:
        assert r["prefill_tok_s"] > 0
        if r["method"] in ("superlinear", "hylra"):  # key summary tables, rebuilt from the synthetic keys
            assert r["aux_tables"] in (["kmin/kmax rebuilt from the keys"], ["prepare_synthetic"])
            assert r["aux_bytes"] > 0
    # The table names every method and labels the KV as synthetic.
    assert "synthetic" in captured.out
    for method in methods:
        assert method in captured.out
    read_png(out_png)


def test_throughput_prefill_mode_and_separate_contexts(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--model", "tiny", "--context", "300", "--attention", "dense,hylra",
               "--kv", "prefill", "--prefill-chunk", "128", "--batch", "2", "--separate-contexts",
               "--decode-steps", "2", "--device", "cpu", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out_json.read_text())
    assert report["kv_mode"] == "prefill" and report["context_sharing"] == "separate"
    for r in report["results"]:
        assert "error" not in r, r
        assert r["context"] == 304  # rounded up to whole 16-token blocks
        assert r["context_prefill_tok_s"] > 0
        # two context regions (one per sequence) + private blocks
        assert r["kv_cache_bytes"] == 2 * 2 * (2 * 19 + 2 * 1) * 16 * 1 * 32 * 4


def test_checkpoint_with_fewer_layers(tmp_path, capsys):
    from longserve.engine.loader import load_model
    from longserve.engine.testing import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt", arch="qwen2", num_hidden_layers=3)
    cfg, source, path = tp.model_config(str(ckpt), 2)
    assert cfg.num_layers == 2 and source.startswith("checkpoint") and path == ckpt
    cut = tp.load_checkpoint(path, cfg, torch.device("cpu"), torch.float32)
    full = load_model(ckpt, "cpu", torch.float32, tokenizer=False).model
    assert len(cut.layers) == 2
    full_params = dict(full.named_parameters())
    cut_params = dict(cut.named_parameters())
    assert "layers.1.qkv_proj.weight" in cut_params and "layers.2.qkv_proj.weight" not in cut_params
    for name, a in cut_params.items():
        assert torch.equal(a, full_params[name]), name
    out = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--model", str(ckpt), "--num-layers", "2", "--context", "64",
               "--attention", "dense", "--decode-steps", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["model"]["config"]["num_layers"] == 2 and report["model"]["config"]["architecture"] == \
        "Qwen2ForCausalLM"
    rc = main(["bench", "throughput", "--model", str(ckpt), "--num-layers", "4", "--context", "64"])
    assert rc == 1 and "exceeds the checkpoint's 3 layers" in capsys.readouterr().err
    rc = main(["bench", "throughput", "--model", "no-such-model", "--context", "64"])
    assert rc == 1 and "neither a preset" in capsys.readouterr().err


def test_triton_paths_through_the_harness(tmp_path):
    """The GPU code path (Triton kernels, via the interpreter on CPU) runs on the harness's metadata."""
    pytest.importorskip("triton")
    small = {"superlinear": {"sw_index": 3}, "hylra": {"topk_tokens": 64},
             "routing": {"segment_tokens": 128, "budget_tokens": 64, "window": 32}}
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "longserve.server.cli", "bench", "throughput", "--model", "tiny", "--context", "256",
           "--attention-impl", "triton", "--device", "cpu", "--decode-steps", "1", "--batch", "1,2",
           "--prefill-tokens", "16", "--prefill-chunk", "16", "--attention-config", json.dumps(small),
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["attention_impl"] == "triton" and report["methods"]
    for r in report["results"]:
        assert "error" not in r, r
        assert r["decode_ms_per_step"] > 0 and r["prefill_tok_s"] > 0


@pytest.mark.slow
def test_ci_one_million_tokens(tmp_path, capsys):
    """The CI run of the issue: tiny preset, 1M tokens of synthetic KV, dense and every sparse method."""
    methods = available_methods()
    out_json, out_png = tmp_path / "1m.json", tmp_path / "1m.png"
    rc = main(["bench", "throughput", "--model", "tiny", "--context", "1M", "--attention", ",".join(methods),
               "--kv", "synthetic", "--decode-steps", "4", "--device", "cpu", "--json", str(out_json),
               "--plot", str(out_png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out_json.read_text())
    check_report(report, methods, [1 << 20], [1], preset_config("tiny"))
    read_png(out_png)
    with capsys.disabled():  # the ratios go into the test log
        print("\n" + captured.out)


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_impossible_size_fails_fast_without_allocating(capsys):
    can_reset = _peak_rss_reset()
    before = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    rc = main(["bench", "throughput", "--model", "qwen2.5-7b-1m", "--context", "10M", "--device", "cpu",
               "--json", "/nonexistent/never-written.json"])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1, err
    line = err[0]
    assert line.startswith("longserve bench throughput: error: 10M tokens of context")
    for word in ("needs", "GiB", "available", "--num-layers", "--context"):
        assert word in line
    assert elapsed < 5.0
    if can_reset:  # the 28 GiB of weights and 1 TiB of KV were never touched
        assert _rss_kib("VmHWM") - before < 200 * 1024


def test_memory_check_suggests_what_fits():
    cfg = preset_config("qwen2.5-7b-1m")
    args = _args(context=[10 << 20], batch=[1])
    dtype, device = torch.bfloat16, torch.device("cuda")  # sizes only: nothing touches a GPU
    aux = tp.aux_bytes_per_block({"kmin": ((4, 128), None), "kmax": ((4, 128), None)}, dtype)
    available = 80 << 30
    with pytest.raises(tp.BenchError) as e:
        tp.check_fits(cfg, dtype, device, args, aux, 64, available)
    message = str(e.value)
    assert "\n" not in message
    fit = int(message.split("--num-layers ")[1].split(" ")[0])
    need = lambda layers: tp.memory_need(tp.replace(cfg, num_layers=layers), dtype, device,  # noqa: E731
                                         tp.make_layout(10 << 20, 64, args), aux, args).total
    assert need(fit) <= available < need(fit + 1)
    tp.check_fits(tp.replace(cfg, num_layers=fit), dtype, device, args, aux, 64, available)  # no raise
    ctx = parse_size(message.split("--context ")[1].split(" ")[0])
    assert tp.memory_need(cfg, dtype, device, tp.make_layout(ctx, 64, args), aux, args).total <= available


def _args(**kw):
    import argparse

    base = dict(context=[4096], batch=[1], warmup_steps=1, decode_steps=4, prefill_tokens=0, prefill_chunk=8192,
                separate_contexts=False)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("name", list(PRESETS))
def test_weight_count_matches_the_model(name):
    from longserve.engine.models.decoder import DecoderModel

    cfg = preset_config(name, num_layers=1 if name != "tiny" else None)
    model = DecoderModel(cfg, device="meta")  # shapes only, nothing allocated
    assert weight_count(cfg) == sum(p.numel() for p in model.parameters())


def test_presets_have_the_published_shapes():
    q = preset_config("qwen2.5-7b-1m")
    assert (q.num_layers, q.num_heads, q.num_kv_heads, q.head_dim, q.hidden_size, q.intermediate_size,
            q.vocab_size, q.rope.theta, q.attention_bias) == (28, 28, 4, 128, 3584, 18944, 152064, 1e7, True)
    ll = preset_config("llama-3.1-8b")
    assert (ll.num_layers, ll.num_heads, ll.num_kv_heads, ll.head_dim, ll.hidden_size, ll.intermediate_size,
            ll.vocab_size, ll.rope.rope_type, ll.rope.factor) == (32, 32, 8, 128, 4096, 14336, 128256, "llama3", 8.0)
    assert preset_config("llama-3.1-8b", num_layers=3).num_layers == 3


def test_random_model_runs_finite():
    cfg = preset_config("tiny")
    model = random_model(cfg, torch.device("cpu"), torch.float32, seed=1)
    again = random_model(cfg, torch.device("cpu"), torch.float32, seed=1)
    assert torch.equal(model.embed_tokens, again.embed_tokens)
    assert model.layers[0].input_layernorm.weight.eq(1).all()
    hidden = model.compute_logits(model.embed_tokens[:3])
    assert torch.isfinite(hidden).all()


@pytest.mark.parametrize("method", ["superlinear", "hylra"])
def test_synthetic_aux_tables_equal_what_the_backend_writes(method):
    """rebuild_aux over directly written keys gives the tables the backend itself keeps when it writes them."""
    from longserve.kernels.base import LayerCache
    from longserve.kernels.registry import build_backend

    backend = build_backend(method, 1)
    specs = backend.aux_specs(2, 8)
    assert set(specs) in ({"kmin", "kmax"}, {"kmean"})  # hylra's default scores blocks by mean keys
    bs, blocks, ctx = 4, 9, 36
    torch.manual_seed(0)
    k = torch.randn(ctx, 2, 8)
    v = torch.randn(ctx, 2, 8)
    q = torch.randn(ctx, 4, 8)
    caches = tp.allocate_aux([LayerCache(torch.zeros(blocks, 2, bs, 8), torch.zeros(blocks, 2, bs, 8))], specs,
                             blocks, torch.float32)
    table = list(range(blocks))
    # The backend's own path: a prefill of the whole context (it writes the keys and its tables).
    meta = AttentionMetadata.for_step([table], [ctx], [ctx], bs)
    backend.forward(0, q, k, v, caches[0], meta, StepState())
    expected = {name: t.clone() for name, t in caches[0].aux.items()}
    for t in caches[0].aux.values():
        t.fill_(float("nan"))
    assert tp.rebuild_aux(backend, 0, caches[0], blocks) in ("kmin/kmax rebuilt from the keys", "prepare_synthetic")
    for name in expected:
        assert torch.equal(caches[0].aux[name], expected[name]), name


def test_fill_synthetic_fills_only_the_context():
    from longserve.kernels.base import LayerCache

    caches = [LayerCache(torch.zeros(10, 1, 4, 8), torch.zeros(10, 1, 4, 8)) for _ in range(2)]
    tp.fill_synthetic(caches, 6, seed=0)
    for c in caches:
        for t in (c.k, c.v):
            assert t[:6].std() > 0.5 and torch.isfinite(t).all()
            assert t[6:].eq(0).all()
    assert not torch.equal(caches[0].k[:6], caches[1].k[:6])


def test_sizes_parse_and_print():
    assert parse_size("128K") == 131072 and parse_size("1M") == 1 << 20 and parse_size("10M") == 10 << 20
    assert parse_size("1.5M") == 3 << 19 and parse_size("4096") == 4096
    assert [format_tokens(n) for n in (1 << 20, 128 << 10, 10 << 20, 3 << 19, 1000)] == \
        ["1M", "128K", "10M", "1.5M", "1000"]


@pytest.mark.parametrize("argv, message", [
    (["--context", "lots"], "is not a token count"),
    (["--attention", "dense,magic"], "unknown attention method 'magic'"),
    (["--batch", "0"], "must be >= 1"),
    (["--attention-config", '{"magic": {}}'], "unknown method(s) magic"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "throughput", *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_method_parameter_is_reported_as_unavailable(capsys, tmp_path):
    rc = main(["bench", "throughput", "--model", "tiny", "--context", "64", "--attention", "dense,hylra",
               "--attention-config", '{"hylra": {"topk_tokens": -1}}', "--decode-steps", "1", "--device", "cpu",
               "--json", str(tmp_path / "r.json")])
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["methods"] == ["dense"] and "topk_tokens" in report["unavailable"]["hylra"]
    assert "hylra: not available" in capsys.readouterr().err


def test_a_failing_method_gets_error_rows_and_the_others_run(tmp_path, capsys, monkeypatch):
    from longserve.kernels.hylra import HyLRABackend

    def broken(self, *args, **kwargs):
        raise ModuleNotFoundError("No module named 'longserve.kernels.triton.hylra_v2'")

    monkeypatch.setattr(HyLRABackend, "forward", broken)
    out = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--model", "tiny", "--context", "64", "--attention", "dense,hylra",
               "--batch", "1,2", "--decode-steps", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["batch"], "error" in r) for r in rows] == [("dense", 1, False), ("dense", 2, False),
                                                                       ("hylra", 1, True), ("hylra", 2, True)]
    assert rows[2]["error"].startswith("ModuleNotFoundError: No module named")
    captured = capsys.readouterr()
    assert "hylra: failed: ModuleNotFoundError" in captured.err and "failed: ModuleNotFoundError" in captured.out


def test_decode_cpu_rows_and_shares(tmp_path, capsys):
    """`longserve bench decode-cpu` at a tiny shape: a row per method and setting, dense attends every key, a
    small superlinear window fewer (the share read from its selection), the table printed."""
    out = tmp_path / "decode.json"
    rc = main(["bench", "decode-cpu", "--keys", "200", "--batch", "1,3", "--steps", "2", "--warmup", "1",
               "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--attention", "dense,hylra,routing",
               "--variant", 'sl=superlinear:{"sw_index": 3, "num_spans": 1}', "--json", str(out),
               "--system-malloc"])  # the suite's process keeps glibc's defaults
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["environment"]["freed_memory_kept"] is False
    rows = report["rows"]
    assert [(r["batch"], r["label"]) for r in rows] == [(b, m) for b in (1, 3) for m in ("dense", "hylra", "routing",
                                                                                        "sl")]
    for r in rows:
        assert r["keys"] == 200 and 0 < r["best_ms"] <= r["median_ms"]
        if r["label"] == "dense":
            assert r["attended_share"] == 1.0 and r["vs_dense"] == 1.0
    sl = [r for r in rows if r["label"] == "sl"]
    # window 15 + 16 sinks + one span of at most ceil(2 sqrt(t)) + ceil(sqrt(t)) + 1 keys, of about 201
    assert all(0.15 < r["attended_share"] < 0.5 for r in sl)
    assert "| 200 | 3 | sl |" in capsys.readouterr().out


def test_decode_cpu_bad_variant_is_one_line(capsys):
    assert main(["bench", "decode-cpu", "--keys", "64", "--steps", "1", "--system-malloc", "--variant",
                 'x=superlinear:{"num_spans": 0}']) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "num_spans" in err
    with pytest.raises(SystemExit) as e:
        main(["bench", "decode-cpu", "--variant", "nothing"])
    assert e.value.code == 2


def test_bench_imports_no_server_packages():
    """bench runs on a GPU image that has only torch/triton/numpy/safetensors/tokenizers/transformers."""
    code = ("import sys, longserve.bench.cli, longserve.bench.throughput, longserve.bench.serve, "
            "longserve.bench.decode_cpu, "
            "longserve.bench.presets, longserve.bench.plotting; "
            "bad = sorted(m for m in ('fastapi', 'uvicorn', 'pydantic', 'httpx', 'matplotlib') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cli_name_lists_mirror_the_registries():
    from longserve.bench.cli import METHOD_NAMES, PRESET_NAMES

    assert METHOD_NAMES == tuple(METHODS) and PRESET_NAMES == tuple(PRESETS)


def test_bench_without_subcommand_prints_help(capsys):
    assert main(["bench"]) == 2
    out = capsys.readouterr().out
    assert "throughput" in out and "serve" in out


# ---------------------------------------------------------------------------------------------------- serve

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    import httpx

    from longserve.engine.testing import tiny_checkpoint

    model = tiny_checkpoint(tmp_path_factory.mktemp("bench-model") / "llama", arch="llama")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("bench-log") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "longserve.server.cli", "serve", "--model", str(model),
                                 "--device", "cpu", "--dtype", "float32", "--port", str(port),
                                 "--served-model-name", "tiny-bench", "--block-size", "16", "--num-kv-blocks", "1024"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not healthy:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _check_serve_report(report: dict, num: int, output_len: int) -> None:
    assert report["failed"] == 0, report["failure_reasons"]
    assert report["completed"] == num
    assert report["total_output_tokens"] == num * output_len  # ignore_eos: every request runs to max_tokens
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration_s"):
        assert report[key] > 0, key
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        s = report[key]
        assert None not in s.values(), key
        assert 0 < s["median"] <= s["p90"] <= s["p99"], key
    assert report["ttft_ms"]["mean"] < report["e2e_latency_ms"]["mean"]
    assert all(r["ok"] and r["output_tokens"] == output_len for r in report["requests"])


def test_serve_against_longserve(live_server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", live_server, "--dataset", "random", "--num-prompts", "8",
               "--max-concurrency", "4", "--input-len", "48", "--output-len", "6", "--json", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads(out.read_text())
    _check_serve_report(report, 8, 6)
    assert report["server"]["model"] == "tiny-bench"  # found through /v1/models
    assert report["prompt_length_method"].startswith("server /tokenize")
    # The byte-level tokenizer makes a word several tokens; prompts were sized in the server's tokens.
    assert report["tokens_per_word"]["words"] > 3
    # Each prompt's length is approximate (words differ in length); on average it is the asked length.
    lengths = [r["prompt_tokens"] for r in report["requests"]]
    assert all(24 <= n <= 72 for n in lengths), lengths
    assert 48 * 0.85 <= sum(lengths) / len(lengths) <= 48 * 1.15, lengths
    assert report["mean_input_tokens"] == sum(lengths) / len(lengths)
    for name in ("TTFT", "TPOT", "ITL", "E2E latency", "output tokens/s", "request throughput"):
        assert name in captured.out


def test_serve_shared_prefix_at_a_request_rate(live_server, tmp_path, capsys):
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", live_server + "/v1", "--model", "tiny-bench", "--dataset",
               "shared-prefix", "--num-prompts", "6", "--request-rate", "20", "--input-len", "64", "--output-len", "4",
               "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    _check_serve_report(report, 6, 4)
    assert report["config"]["request_rate"] == 20


def test_serve_reports_failures(live_server, tmp_path, capsys):
    """Requests the server refuses are counted as failures with the server's reason."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello there", "max_tokens": 3}) + "\n"
                       + json.dumps({"prompt": "x " * 20000, "max_tokens": 3}) + "\n")
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--base-url", live_server, "--dataset", str(prompts), "--num-prompts", "4",
               "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["completed"] == 2 and report["failed"] == 2
    (reason, count), = report["failure_reasons"].items()
    assert count == 2 and reason.startswith("HTTP 400")
    assert "failed x2" in capsys.readouterr().out


def test_serve_unreachable_server(tmp_path, capsys):
    port = _free_port()
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--num-prompts", "2"])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot list models" in err[0]
    rc = main(["bench", "serve", "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--num-prompts", "2",
               "--json", str(tmp_path / "s.json")])
    assert rc == 1
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["completed"] == 0 and report["failed"] == 2
    assert list(report["failure_reasons"].values()) == [2]


def test_dataset_file_errors(tmp_path):
    from longserve.bench.serve import ServeBenchError, make_prompts

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(ServeBenchError, match="entry 0"):
        make_prompts(str(bad), 2, None, None, 8, {"words": 1.0}, 0)
    with pytest.raises(ServeBenchError, match="neither"):
        make_prompts(str(tmp_path / "missing.jsonl"), 2, None, None, 8, {"words": 1.0}, 0)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(["a b c", {"prompt": "d e", "max_tokens": 5}]))
    prompts = make_prompts(str(good), 3, None, None, 8, {"words": 2.0}, 0)
    assert [(p.text, p.approx_tokens, p.max_tokens) for p in prompts] == [("a b c", 6, 8), ("d e", 4, 5),
                                                                          ("a b c", 6, 8)]


@pytest.mark.parametrize("dataset, input_len", [("random", 300), ("long", 2000), ("shared-prefix", 400)])
def test_generated_prompts_have_the_asked_length(dataset, input_len):
    """Counted the way the approximation counts (words and marks), a prompt is within a few tokens of the
    asked length, documents (with their line markers) included."""
    import random

    from longserve.bench.serve import _document, approx_tokens, make_prompts

    # What calibrate() finds without /tokenize: one token per word, and the documents' own ratio.
    ratios = {"words": 1.0, "document": approx_tokens(_document(random.Random(1), 4000)) / 4000}
    assert ratios["document"] > 1.1  # line markers and full stops cost tokens too
    prompts = make_prompts(dataset, 3, input_len, None, 8, ratios, 0)
    for p in prompts:
        assert abs(approx_tokens(p.text) - input_len) <= input_len * 0.03 + 4, approx_tokens(p.text)
    if dataset == "shared-prefix":
        prefix = os.path.commonprefix([p.text for p in prompts])
        assert abs(approx_tokens(prefix) - 300) <= 12
        assert len({p.text for p in prompts}) == 3

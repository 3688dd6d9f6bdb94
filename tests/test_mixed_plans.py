"""Plans that mix methods per layer (policy format 2): loading, refusals, per-layer routing, and reuse for
every method that selects (a reuse layer attends to what its source selected in the same pass)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from longserve.kernels.base import AttentionMetadata, BackendError, LayerCache, StepState
from longserve.kernels.plan import POLICY_FORMAT, AttentionPlan, LayerPlan
from longserve.kernels.reference import dense as ref_dense
from longserve.kernels.registry import PlannedBackend, build_backend

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_HYLRA = ROOT / "policies" / "smollm2-135m-instruct.hylra.json"

HQ, HKV, D, BS = 4, 2, 16, 4
# Small budgets so that every method is really sparse at ~100 tokens of context.
PARAMS = {  # prefill "sparse": prompt chunks select too, so the steps below exercise every method's selection
    "hylra": {"topk_tokens": 16, "sink_blocks": 1, "recent_blocks": 1, "prefill_tile": 8, "prefill": "sparse"},
    "superlinear": {"sw_index": 1, "num_spans": 2, "impl": "torch", "prefill": "sparse"},  # window 3 keys
    "routing": {"segment_tokens": 32, "tokens_per_cluster": 8, "budget_tokens": 12, "sink_tokens": 2,
                "window": 8, "prefill_tile": 8, "prefill": "sparse"},
}
MIXED_LAYERS = [
    LayerPlan("full"),
    LayerPlan("compute", method="hylra"),
    LayerPlan("compute", method="superlinear"),
    LayerPlan("reuse", 1),  # hylra, from its source
    LayerPlan("reuse", 2, method="superlinear"),
    LayerPlan("compute", method="routing"),
    LayerPlan("reuse", 5),
    LayerPlan("compute"),  # the plan's method (hylra)
]


def mixed_plan() -> AttentionPlan:
    return AttentionPlan("hylra", list(MIXED_LAYERS), dict(PARAMS["hylra"]),
                         method_params={m: dict(p) for m, p in PARAMS.items() if m != "hylra"})


# ---------------------------------------------------------------- the file format

def test_format_2_round_trip(tmp_path):
    plan = mixed_plan()
    plan.validate()
    assert plan.methods() == ["hylra", "superlinear", "routing"]
    assert [plan.layer_method(i) for i in range(len(plan.layers))] == [
        "dense", "hylra", "superlinear", "hylra", "superlinear", "routing", "routing", "hylra"]
    plan.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["format"] == POLICY_FORMAT == "longserve-policy/2"
    assert data["params"] == PARAMS and data["layers"][2] == {"mode": "compute", "method": "superlinear"}
    again = AttentionPlan.load(tmp_path / "p.json")
    assert again == plan and again.to_json() == data
    assert again.params_of("routing") == PARAMS["routing"] and again.params_of("dense") == {}


def test_format_2_without_a_plan_method(tmp_path):
    data = {"format": POLICY_FORMAT, "params": {"superlinear": {"sw_index": 3}},
            "layers": [{"mode": "full"}, {"mode": "compute", "method": "superlinear"}, {"mode": "reuse", "source": 1}]}
    plan = AttentionPlan.from_json(data)
    assert plan.method == "superlinear" and plan.params == {"sw_index": 3} and plan.methods() == ["superlinear"]
    assert plan.layer_method(2) == "superlinear"


def test_format_1_still_loads(tmp_path):
    plan = AttentionPlan.load(SHIPPED_HYLRA)
    assert json.loads(SHIPPED_HYLRA.read_text())["format"] == "longserve-policy/1"
    assert plan.methods() == ["hylra"] and plan.params["topk_tokens"] == 2048
    assert all(lp.method is None for lp in plan.layers)
    plan.save(tmp_path / "v2.json")  # written back as format 2, the same plan
    assert AttentionPlan.load(tmp_path / "v2.json") == plan
    backend = build_backend(plan=plan, impl="torch")
    assert backend.name == "hylra" and list(backend.methods) == ["hylra"]


def write(tmp_path, data) -> Path:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    return path


def load_error(tmp_path, data) -> str:
    with pytest.raises(BackendError) as e:
        build_backend(plan=AttentionPlan.load(write(tmp_path, data)), impl="torch")
    message = str(e.value)
    assert "\n" not in message
    return message


def layers_json(*entries):
    return {"format": POLICY_FORMAT, "method": "hylra", "params": {}, "layers": list(entries)}


@pytest.mark.parametrize("data, match", [
    (layers_json({"mode": "full"}, {"mode": "compute", "method": "sparse"}),
     "policy layer 1: unknown method 'sparse'"),
    ({"format": POLICY_FORMAT, "layers": [{"mode": "compute", "method": "quest"}]},  # no plan method either
     "policy layer 0: unknown method 'quest'"),
    (layers_json({"mode": "compute", "method": "superlinear"}, {"mode": "reuse", "source": 0, "method": "hylra"}),
     "policy layer 1: a hylra layer cannot reuse layer 0's superlinear selection"),
    (layers_json({"mode": "compute", "method": "routing"}, {"mode": "compute", "method": "hylra"},
                 {"mode": "reuse", "source": 0, "method": "hylra"}),
     "policy layer 2: a hylra layer cannot reuse layer 0's routing selection"),
    (layers_json({"mode": "full"}, {"mode": "reuse", "source": 0, "method": "superlinear"}),
     "reuse source 0 is a 'full' layer"),
    (layers_json({"mode": "full", "method": "hylra"}), "a 'full' layer runs dense attention"),
    (layers_json({"mode": "compute", "method": "dense"}), "a 'compute' layer needs a sparse method"),
    ({**layers_json({"mode": "compute"}), "params": {"hylra": {}, "quest": {}}}, "'params' maps method names"),
    ({**layers_json({"mode": "compute"}), "params": {"topk_tokens": 5}}, "'params' maps method names"),
    ({**layers_json({"mode": "compute", "method": "superlinear"}), "params": {"superlinear": {"window": 5}}},
     "superlinear: unknown parameter 'window'"),
    ({**layers_json({"mode": "compute", "method": "routing"}), "format": "longserve-policy/1"},
     "'method' must be a string (and needs format"),
])
def test_refusals_are_one_line(tmp_path, data, match):
    assert match in load_error(tmp_path, data)


def test_attention_config_overrides_per_method():
    plan = mixed_plan()
    backend = build_backend(plan=plan, params={"superlinear": {"num_spans": 1}, "routing": {"budget_tokens": 4}},
                            impl="torch")
    assert backend.methods["superlinear"].params.num_spans == 1
    assert backend.methods["routing"].params["budget_tokens"] == 4
    assert backend.methods["hylra"].params["topk_tokens"] == 16
    flat = build_backend(plan=plan, params={"topk_tokens": 32}, impl="torch")  # flat: the plan's method
    assert flat.methods["hylra"].params["topk_tokens"] == 32
    assert plan.params["topk_tokens"] == 16  # the loaded plan is not changed


def test_aux_tables_are_the_union():
    hq = PlannedBackend(AttentionPlan("hylra", [LayerPlan("compute"), LayerPlan("compute", method="superlinear")],
                                      {"score": "bound"}, method_params={"superlinear": {"score": "bound"}}))
    assert sorted(hq.aux_specs(HKV, D)) == ["kmax", "kmin"]  # the same tables: one allocation
    both = PlannedBackend(AttentionPlan("hylra", [LayerPlan("compute"), LayerPlan("compute", method="superlinear")],
                                        {"score": "bound"}))
    assert sorted(both.aux_specs(HKV, D)) == ["kmax", "kmean", "kmin"]  # superlinear scores by mean keys
    mean = PlannedBackend(mixed_plan())
    assert sorted(mean.aux_specs(HKV, D)) == ["kmean"]


# ---------------------------------------------------------------- layer by layer

class World:
    """Sequences growing in a paged cache with one layer cache per layer; random q/k/v per layer and step."""

    def __init__(self, num_layers: int, aux_specs: dict, seed: int = 0, num_blocks: int = 96):
        self.gen = torch.Generator().manual_seed(seed)
        self.caches = [LayerCache(torch.zeros(num_blocks, HKV, BS, D), torch.zeros(num_blocks, HKV, BS, D),
                                  {n: torch.zeros(num_blocks, *s) for n, (s, _) in aux_specs.items()})
                       for _ in range(num_layers)]
        self.seqs: dict[int, dict] = {}
        self.free = list(range(1, num_blocks))[::-1]  # block 0 is the table padding

    def step(self, chunks: dict[int, int]) -> AttentionMetadata:
        pos, slots, qlens, ctxs, tables, ids = [], [], [], [], [], []
        for sid, n in chunks.items():
            s = self.seqs.setdefault(sid, {"blocks": [], "done": 0})
            a, b = s["done"], s["done"] + n
            while len(s["blocks"]) * BS < b:
                s["blocks"].append(self.free.pop())
            pos += range(a, b)
            slots += [s["blocks"][p // BS] * BS + p % BS for p in range(a, b)]
            qlens.append(n)
            ctxs.append(b)
            ids.append(sid)
            s["done"] = b
        width = max(len(self.seqs[sid]["blocks"]) for sid in chunks)
        tables = [self.seqs[sid]["blocks"] + [0] * (width - len(self.seqs[sid]["blocks"])) for sid in chunks]
        starts = [0]
        for n in qlens:
            starts.append(starts[-1] + n)
        return AttentionMetadata(
            positions=torch.tensor(pos), slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
            context_lens=torch.tensor(ctxs, dtype=torch.int32), query_start_loc=torch.tensor(starts, dtype=torch.int32),
            block_size=BS, context_lens_cpu=ctxs, query_lens_cpu=qlens, seq_ids=ids)


SCHEDULE = [{1: 40, 2: 24}, {1: 40, 2: 40}, {1: 30, 2: 1}, {1: 1, 2: 1}, {1: 1, 2: 1}]


def inputs(num_layers: int, tokens: int, step: int):
    """The same random q/k/v of every layer for every run of a step."""
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(tokens, HQ, D, generator=g), torch.randn(tokens, HKV, D, generator=g),
             torch.randn(tokens, HKV, D, generator=g)) for _ in range(num_layers)]


def run_layers(backend, schedule=SCHEDULE):
    """Outputs [step][layer] of a backend driven over the schedule (each layer fed its own inputs)."""
    n = len(MIXED_LAYERS)
    world = World(n, backend.aux_specs(HKV, D))
    outs = []
    for i, chunks in enumerate(schedule):
        meta = world.step(chunks)
        state = StepState()
        outs.append([backend.forward(layer, q, k, v, world.caches[layer], meta, state)
                     for layer, (q, k, v) in enumerate(inputs(n, meta.num_tokens, i))])
    return outs


def single_method_plan(method: str) -> AttentionPlan:
    """The mixed plan's layers of one method (same modes and sources), every other layer full."""
    layers = [LayerPlan(lp.mode, lp.source) if mixed_plan().layer_method(i) == method else LayerPlan("full")
              for i, lp in enumerate(MIXED_LAYERS)]
    return AttentionPlan(method, layers, dict(PARAMS[method]))


def test_mixed_forward_equals_each_layers_method_alone():
    plan = mixed_plan()
    mixed = run_layers(PlannedBackend(plan, impl="torch"))
    alone = {m: run_layers(PlannedBackend(single_method_plan(m), impl="torch")) for m in plan.methods()}
    dense = run_layers(build_backend("dense", len(MIXED_LAYERS), impl="torch"))
    for step, outs in enumerate(mixed):
        for layer, out in enumerate(outs):
            m = plan.layer_method(layer)
            want = dense[step][layer] if m == "dense" else alone[m][step][layer]
            torch.testing.assert_close(out, want, atol=0, rtol=0, msg=f"step {step} layer {layer} ({m})")
    # and the sparse layers really are sparse: decode outputs differ from dense attention
    for layer in (1, 2, 5):
        assert not torch.allclose(mixed[-1][layer], dense[-1][layer], atol=1e-4)


# ---------------------------------------------------------------- reuse = attention with the source's selection

def attend_with(method_backend, method: str, q, cache: LayerCache, meta: AttentionMetadata, selection):
    """Each method's attention over a given selection (no selecting)."""
    if method == "hylra":
        from longserve.kernels.reference import hylra as ref
        return ref.attend(q, cache.k, cache.v, meta, selection)
    if method == "routing":
        from longserve.kernels.reference import routing as ref
        return ref.attend(q, cache.k, cache.v, meta.block_tables, selection)
    return method_backend.attend(q, cache, meta, selection)


@pytest.mark.parametrize("method", ["hylra", "superlinear", "routing"])
def test_reuse_equals_attention_with_the_source_selection(method):
    layers = [LayerPlan("compute"), LayerPlan("reuse", 0), LayerPlan("compute")]
    backend = PlannedBackend(AttentionPlan(method, layers, dict(PARAMS[method])), impl="torch")
    inner = backend.methods[method]
    world = World(3, backend.aux_specs(HKV, D), seed=3)
    differs = 0
    for i, chunks in enumerate(SCHEDULE):
        meta = world.step(chunks)
        state = StepState()
        (q0, k0, v0), (q1, k1, v1), _ = inputs(3, meta.num_tokens, i)
        backend.forward(0, q0, k0, v0, world.caches[0], meta, state)
        reused = backend.forward(1, q1, k1, v1, world.caches[1], meta, state)
        assert set(state.selections) == {0}  # the reuse layer selects nothing
        want = attend_with(inner, method, q1, world.caches[1], meta, state.selections[0])
        torch.testing.assert_close(reused, want, atol=0, rtol=0)
        # Layer 2 computes its own selection over the same q/k/v as layer 1 would: where the two
        # selections differ, so do the outputs (so the comparison above proves the source's selection was used).
        world.caches[2].k.copy_(world.caches[1].k)
        world.caches[2].v.copy_(world.caches[1].v)
        for name in world.caches[2].aux:
            world.caches[2].aux[name].copy_(world.caches[1].aux[name])
        own = backend.forward(2, q1, k1, v1, world.caches[2], meta, state)
        differs += not torch.equal(own, reused)
    assert differs > 0


def test_superlinear_reuse_without_a_selection_is_refused():
    backend = PlannedBackend(AttentionPlan("superlinear", [LayerPlan("compute"), LayerPlan("reuse", 0)],
                                           dict(PARAMS["superlinear"])), impl="torch")
    world = World(2, backend.aux_specs(HKV, D))
    meta = world.step({1: 12})
    (q, k, v), _ = inputs(2, meta.num_tokens, 0)
    with pytest.raises(BackendError, match="reuses layer 0's spans"):
        backend.forward(1, q, k, v, world.caches[1], meta, StepState())


# ---------------------------------------------------------------- through the engine

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from longserve.engine.testing import tiny_checkpoint
    return tiny_checkpoint(tmp_path_factory.mktemp("mixed") / "ckpt", num_hidden_layers=5)


def test_llm_runs_a_mixed_policy(tiny_ckpt, tmp_path):
    """LLM(policy=...) with a mixed plan: with budgets that cover the context every method attends to every
    key, so greedy tokens equal dense ones; with small budgets it runs and every method selects."""
    from longserve.engine import LLM, SamplingParams

    layers = [LayerPlan("full"), LayerPlan("compute", method="superlinear"), LayerPlan("reuse", 1),
              LayerPlan("compute", method="hylra"), LayerPlan("compute", method="routing")]
    covering = AttentionPlan("hylra", layers, {"topk_tokens": 4096},
                             method_params={"superlinear": {"sw_index": 40},  # window 1680 keys
                                            "routing": {"budget_tokens": 4096, "segment_tokens": 64}})
    covering.save(tmp_path / "covering.json")
    prompts = [[(5 * i + 3 * j) % 250 + 3 for j in range(n)] for i, n in enumerate([150, 61])]
    greedy = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    opts = dict(model=str(tiny_ckpt), device="cpu", dtype="float32", block_size=16, num_kv_blocks=64,
                max_num_batched_tokens=64)
    dense = [o.outputs[0].token_ids for o in LLM(**opts).generate(prompts, greedy)]
    llm = LLM(policy=str(tmp_path / "covering.json"), **opts)
    assert llm.engine.backend.name == "superlinear+hylra+routing"  # in order of first use
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == dense

    sparse = AttentionPlan("hylra", layers, {"topk_tokens": 32, "recent_blocks": 1, "prefill_tile": 16},
                           method_params={"superlinear": {"sw_index": 3},  # window 15 keys
                                          "routing": {"budget_tokens": 16, "segment_tokens": 64, "window": 16,
                                                      "sink_tokens": 4}})
    sparse.save(tmp_path / "sparse.json")
    llm = LLM(policy=str(tmp_path / "sparse.json"), **opts)
    seen: dict[int, object] = {}
    original = llm.engine.backend.forward

    def spy(layer_idx, q, k, v, cache, meta, state):
        out = original(layer_idx, q, k, v, cache, meta, state)
        seen.update(state.selections)
        return out

    llm.engine.backend.forward = spy
    out = llm.generate(prompts, greedy)
    assert all(len(o.outputs[0].token_ids) == 5 for o in out)
    assert sorted(seen) == [1, 3, 4]  # the compute layers of each method left a selection; reuse layer 2 none


# ---------------------------------------------------------------- the profiler's method search

def test_choose_methods_takes_the_cheapest_good_enough_method():
    import numpy as np

    from longserve.policies.profiler import choose_methods

    error = {"hylra": np.array([0.01, 0.2, 0.04, 0.3]), "superlinear": np.array([0.03, 0.02, 0.09, 0.5])}
    keys = {"hylra": np.array([0.3, 0.3, 0.3, 0.3]), "superlinear": np.array([0.1, 0.4, 0.1, 0.1])}
    # layer 0: both good, superlinear cheaper; 1: only superlinear good; 2: only hylra good; 3: none, lower error
    assert choose_methods(error, keys, 0.05, [0, 1, 2, 3]) == {0: "superlinear", 1: "superlinear", 2: "hylra",
                                                               3: "hylra"}
    assert choose_methods(error, keys, 0.0, [0, 1]) == {0: "hylra", 1: "superlinear"}  # none good: lower error


def test_profile_searches_methods_per_layer(tiny_ckpt, tmp_path, capsys):
    import argparse

    from longserve.policies import cli as profile_cli

    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps. " * 18)  # ~1200 tokens
    out = tmp_path / "mixed.json"

    def run(*extra) -> AttentionPlan:
        parser = argparse.ArgumentParser(prog="longserve")
        profile_cli.add_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(["profile", "--model", str(tiny_ckpt), "--calib", str(calib), "--out", str(out),
                                  "--topk-tokens", "128", "--block-size", "16", "--full-layers", "1",
                                  "--probe-every", "8", "--chunk-tokens", "300", "--device", "cpu", "--quiet",
                                  "--methods", "hylra,superlinear", "--method-config", '{"superlinear": {"sw_index": 3}}',
                                  *extra])
        assert args.func(args) == 0, capsys.readouterr().err
        return AttentionPlan.load(out)

    plan = run("--max-error", "1e9")  # every method is good enough: each layer takes the fewest keys
    search = plan.profile["methods"]
    err, share = search["output_error"], search["attended_share"]
    assert set(err) == {"hylra", "superlinear"} and all(len(v) == 5 for v in err.values())
    assert all(0 < s <= 1 for v in share.values() for s in v) and max(max(v) for v in err.values()) > 0
    assert len(plan.profile["full_layers"]) == 1
    for i in range(5):
        want = "dense" if i in plan.profile["full_layers"] else \
            min(("hylra", "superlinear"), key=lambda m: (share[m][i], err[m][i]))
        assert plan.layer_method(i) == search["chosen"][i] == want
    assert "methods:" in capsys.readouterr().out
    plan = run("--max-error", "0")  # nothing is good enough: the lower error
    err = plan.profile["methods"]["output_error"]
    for i in range(5):
        if i not in plan.profile["full_layers"]:
            assert plan.layer_method(i) == min(("hylra", "superlinear"), key=lambda m: err[m][i])
    # FULL: the layer whose best method errs most
    best = [min(err["hylra"][i], err["superlinear"][i]) for i in range(5)]
    assert plan.profile["full_layers"] == [best.index(max(best))]

    from longserve.engine import LLM, SamplingParams
    llm = LLM(model=str(tiny_ckpt), policy=str(out), device="cpu", dtype="float32", block_size=16, num_kv_blocks=128)
    result = llm.generate("The quick brown fox " * 30, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(result[0].outputs[0].token_ids) == 4


@pytest.mark.parametrize("extra, match", [
    (["--methods", "hylra,quest"], "methods must be distinct names among hylra, superlinear"),
    (["--methods", "superlinear", "--method-config", '{"superlinear": {"combine": "gate", "sink_tokens": 0}}'], "combine='union'"),
    (["--methods", "superlinear", "--method-config", '{"superlinear": {"sw_index": 1}}'], "window of at least"),
    (["--methods", "superlinear", "--method-config", '{"routing": {}}'], "method-config"),
])
def test_profile_method_search_refusals(tmp_path, capsys, extra, match):
    import argparse

    from longserve.policies import cli as profile_cli

    calib = tmp_path / "c.txt"
    calib.write_text("text " * 100)
    parser = argparse.ArgumentParser(prog="longserve")
    profile_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "--calib", str(calib), "--out", str(tmp_path / "p.json"),
                              "--block-size", "16", "--quiet", *extra])
    assert args.func(args) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


# ---------------------------------------------------------------- bench throughput --policy

def test_bench_throughput_runs_policies(tmp_path, capsys):
    from longserve.bench.presets import preset_config
    from longserve.server.cli import main

    info = preset_config("tiny").model_info()  # 2 layers
    mixed = AttentionPlan("superlinear", [LayerPlan("compute"), LayerPlan("compute", method="hylra")],
                          {"sw_index": 15}, info, method_params={"hylra": {"topk_tokens": 256}})
    mixed.save(tmp_path / "mixed.json")
    out = tmp_path / "r.json"
    rc = main(["bench", "throughput", "--model", "tiny", "--context", "2K", "--policy", str(tmp_path / "mixed.json"),
               "--decode-steps", "1", "--device", "cpu", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"dense", "policy:mixed"}  # dense is the baseline by default
    row = rows["policy:mixed"]
    assert row["decode_ms_per_step"] > 0 and row["decode_speedup_vs_dense"] > 0
    # each layer's tables rebuilt by its own method (superlinear's and hylra's prepare_synthetic)
    assert row["aux_tables"] == ["prepare_synthetic"] and row["aux_bytes"] > 0

    wrong = AttentionPlan("hylra", [LayerPlan("compute")] * 3, {}, {**info, "num_layers": 3})
    wrong.save(tmp_path / "wrong.json")
    rc = main(["bench", "throughput", "--model", "tiny", "--context", "2K", "--policy", str(tmp_path / "wrong.json"),
               "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and "--policy" in err[-1] and "num_layers=3" in err[-1]


@pytest.mark.slow  # about a minute in the Triton interpreter on a busy 2-core machine
def test_superlinear_triton_reuse_matches_the_reference():
    """The Triton path (interpreter on CPU) hands its spans ([T, Hq, K, 2] key ranges) to the reuse layer too:
    compute + reuse layers equal the PyTorch path's, step by step."""
    layers = [LayerPlan("compute"), LayerPlan("reuse", 0)]
    params = {"sw_index": 1, "num_spans": 2, "prefill": "sparse"}  # every step selects
    outs = {}
    for impl in ("torch", "triton"):
        backend = PlannedBackend(AttentionPlan("superlinear", layers, dict(params, impl=impl)), impl=impl)
        world = World(2, backend.aux_specs(HKV, D), seed=5)
        outs[impl] = []
        for i, chunks in enumerate([{1: 20, 2: 7}, {1: 1, 2: 1}]):  # small: the interpreter is slow
            meta = world.step(chunks)
            state = StepState()
            for layer, (q, k, v) in enumerate(inputs(2, meta.num_tokens, i)):
                outs[impl].append(backend.forward(layer, q, k, v, world.caches[layer], meta, state))
            assert set(state.selections) == {0}
            assert (state.selections[0].paged is not None) == (impl == "triton")
    for got, want in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- the shipped mixed policy

def test_shipped_mixed_policy_fits_the_default_model():
    from importlib import resources

    from longserve.engine.loader import resolve_model_path
    from longserve.engine.models.decoder import ModelConfig

    path = ROOT / "policies" / "smollm2-135m-instruct.mixed.json"
    assert json.loads(path.read_text())["format"] == POLICY_FORMAT
    plan = AttentionPlan.load(path)
    info = ModelConfig.from_pretrained(resolve_model_path(None)).model_info()
    plan.check_model(info)
    assert plan.model["fingerprint"] == info["fingerprint"]
    assert plan.methods() == ["hylra", "superlinear"]
    chosen = plan.profile["methods"]["chosen"]
    assert chosen == [plan.layer_method(i) for i in range(len(plan.layers))]
    assert chosen.count("dense") == 2 and chosen.count("superlinear") > 0
    # every superlinear layer is within the profile's error bound; the rule picked it for fewer keys
    search = plan.profile["methods"]
    for i, m in enumerate(chosen):
        if m == "superlinear":
            assert search["output_error"]["superlinear"][i] <= search["max_error"]
            assert search["attended_share"]["superlinear"][i] < search["attended_share"]["hylra"][i]
    backend = build_backend(plan=plan, impl="torch")
    assert sorted(backend.aux_specs(3, 64)) == ["kmax", "kmean", "kmin"]
    assert (resources.files("longserve.policies") / path.name).is_file()  # shipped as package data

"""`longserve eval`: task generators, exact scoring, the attended-share and needle-recall probe, fidelity, and
the CLI end to end on a tiny random checkpoint."""

import json
import random

import pytest
import torch

from longserve.evals.probe import IntervalRows, KeyRows, SelectionProbe, attended_sum, visible_sum
from longserve.evals.tasks import TASKS, TaskBuilder, answer_found, load_haystack_text, score


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from longserve.engine.testing import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_hidden_layers=4)


@pytest.fixture(scope="module")
def builder(tiny):
    from transformers import AutoTokenizer

    return TaskBuilder(AutoTokenizer.from_pretrained(str(tiny)), load_haystack_text())


# -- tasks -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", TASKS)
def test_generators_are_deterministic_and_plant_each_answer_once(builder, task):
    for depth in (0.0, 0.5, 1.0):
        a = builder.build(task, 1200, depth, 0, seed=7)
        b = builder.build(task, 1200, depth, 0, seed=7)
        assert a.prompt_ids == b.prompt_ids and a.answers == b.answers
        assert len(a.prompt_ids) <= 1200 and len(a.prompt_ids) > 1000  # filled up to the target length
        for answer in a.answers:
            assert a.prompt_text.count(answer) == 1
        # the evidence positions are the needle's tokens, before the question
        evidence = builder.tokenizer.decode([a.prompt_ids[i] for i in a.evidence_positions])
        assert all(ans in evidence for ans in a.answers)
        assert max(a.evidence_positions) < a.question_start < len(a.prompt_ids)
        # the answer never leaks into the question or the answer prefix
        tail = builder.tokenizer.decode(a.prompt_ids[a.question_start:])
        assert not any(ans in tail for ans in a.answers)
    other = builder.build(task, 1200, 0.5, 0, seed=8)
    assert other.prompt_ids != a.prompt_ids


def test_depth_moves_the_needle(builder):
    shallow = builder.build("passkey", 1500, 0.1, 0, seed=1)
    deep = builder.build("passkey", 1500, 0.9, 0, seed=1)
    assert shallow.evidence_positions[0] < 0.35 * len(shallow.prompt_ids)
    assert deep.evidence_positions[0] > 0.65 * len(deep.prompt_ids)


def test_samples_differ_by_index_and_unknown_task_is_refused(builder):
    assert builder.build("niah_single", 800, 0.5, 0, 0).answers != builder.build("niah_single", 800, 0.5, 1, 0).answers
    with pytest.raises(ValueError, match="unknown task"):
        builder.build("nope", 800, 0.5, 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        builder.build("niah_multivalue", 64, 0.5, 0, 0)


def test_scoring_is_exact():
    assert answer_found("12345", "The pass key is 12345.")
    assert answer_found("12345", "12345")
    assert not answer_found("12345", "The pass key is 123456.")  # inside a longer number
    assert not answer_found("12345", "The pass key is 012345")
    assert not answer_found("12345", "1234 5")
    assert not answer_found("abc", "xabc")
    assert score(["11", "22"], "11 and 22") and not score(["11", "22"], "11 and 23")  # multi-value: all of them


# -- probe arithmetic ------------------------------------------------------------------------------------------
def test_attended_and_visible_sums_match_brute_force():
    gen = random.Random(0)
    for _ in range(50):
        first = gen.randrange(0, 60)
        last = first + gen.randrange(0, 20)
        keys = torch.tensor(sorted(gen.sample(range(90), 25)))
        brute = sum(int((keys <= p).sum()) for p in range(first, last + 1))
        assert attended_sum(keys, first, last) == brute
        assert visible_sum(first, last) == sum(p + 1 for p in range(first, last + 1))
        row = KeyRows(0, 0, last - first + 1, first, last, [keys, keys[:3]])
        assert row.attended() == pytest.approx((brute + sum(int((keys[:3] <= p).sum())
                                                            for p in range(first, last + 1))) / 2)


def test_interval_rows_count_the_union_of_window_and_spans():
    gen = torch.Generator().manual_seed(0)
    positions = torch.arange(40, 48)
    lo = torch.randint(0, 50, (2, 8, 4), generator=gen)
    hi = lo + torch.randint(-3, 12, (2, 8, 4), generator=gen)  # some empty, some past the query, overlapping
    rows = IntervalRows(0, 0, positions, torch.stack([lo, hi], -1))
    brute = 0
    for m, p in enumerate(positions.tolist()):
        for h, keys in enumerate(rows.key_sets(p)):
            expect = {k for a, b in zip(lo[h, m].tolist(), hi[h, m].tolist()) for k in range(a, min(b, p) + 1)}
            assert set(keys.tolist()) == expect
            brute += len(expect)
    assert rows.attended() == pytest.approx(brute / 2)


# -- needle recall on a planted needle -------------------------------------------------------------------------
def _planted_run(topk_tokens: int):
    """HyLRA (every layer compute, one layer) over a synthetic sequence whose key 100 is aligned with the last
    query (a planted needle); the probe watches the last 4 positions. Returns the probe."""
    from longserve.engine.testing import make_caches, single_sequence_metadata
    from longserve.kernels.base import StepState
    from longserve.kernels.plan import AttentionPlan
    from longserve.kernels.registry import build_backend

    hq, hkv, d, n, bs = 4, 2, 16, 256, 16
    plan = AttentionPlan.uniform("hylra", 1, {"topk_tokens": topk_tokens, "sink_blocks": 1, "recent_blocks": 2,
                                              "prefill": "sparse"})  # the prompt chunks select (and are probed)
    backend = build_backend(plan=plan, impl="torch")
    probe = SelectionProbe(backend)
    cfg = type("C", (), {"num_layers": 1, "num_kv_heads": hkv, "head_dim": d})()
    caches = make_caches(cfg, n // bs, bs, torch.float32, "cpu", backend.aux_specs(hkv, d))
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(n, hkv, d, generator=gen) * 0.1
    v = torch.randn(n, hkv, d, generator=gen)
    q = torch.randn(n, hq, d, generator=gen) * 0.1
    direction = torch.ones(d) / d ** 0.5
    k[96:104] += 8 * direction  # the needle: one block whose keys the late queries look for
    q[-4:] += 8 * direction
    evidence = list(range(96, 104))
    probe.watch(0, evidence, question_start=n - 4, prompt_len=n)
    table = list(range(n // bs))
    for start in range(0, n, 64):  # chunked prefill, 64 tokens per step
        meta = single_sequence_metadata(table, start, start + 64, bs)
        probe.forward(0, q[start:start + 64], k[start:start + 64], v[start:start + 64], caches[0], meta, StepState())
    return probe


def test_diagnose_recall_is_one_when_the_needle_is_selected_and_below_when_the_budget_excludes_it():
    from longserve.evals.run import diagnosis_of

    found = diagnosis_of(_planted_run(topk_tokens=128), 0)  # 8 blocks: sink, 5 local, 2 scored (the needle)
    assert found["summary"]["prompt"]["recall"] == 1.0
    heads = found["layers"][0]["heads"]
    assert all(h["prompt"]["dense_mass"] > 0.5 for h in heads)  # dense attention needs the needle there
    missed = diagnosis_of(_planted_run(topk_tokens=16), 0)  # the budget holds only the sink and recent blocks
    summary = missed["summary"]["prompt"]
    assert summary["recall"] == 0.0 and summary["recall_where_needed"] == 0.0
    assert summary["missed_beyond_budget"] + summary["missed_within_budget"] == 4 * 4  # 4 queries x 4 heads


def test_attended_share_of_a_small_budget():
    # topk_tokens 16: each 64-query tile keeps only the sink block and its local blocks (the block before the
    # tile and the tile's own four), counted here by brute force over every query and key
    attended = visible = 0
    for start in range(0, 256, 64):
        keys = set(range(16)) | set(range(max(0, start - 16), start + 64))
        for p in range(start, start + 64):
            attended += sum(1 for key in keys if key <= p)
            visible += p + 1
    assert _planted_run(topk_tokens=16).attended_share(0) == pytest.approx(attended / visible)
    assert _planted_run(topk_tokens=4096).attended_share(0) == pytest.approx(1.0)


# -- end to end ------------------------------------------------------------------------------------------------
def _eval_args(*argv):
    from longserve.server.cli import build_parser

    return build_parser().parse_args(["eval", *argv])


@pytest.mark.slow
def test_eval_end_to_end_on_a_tiny_checkpoint(tiny, tmp_path, capsys):
    from longserve.evals.run import run

    out = tmp_path / "eval.json"
    args = _eval_args("--model", str(tiny), "--lengths", "640", "--depths", "0.5", "--tasks", "passkey,vt",
                      "--attention", "hylra", "--attention-config",
                      '{"hylra": [{"topk_tokens": 64, "prefill": "sparse"}]}', "--diagnose",
                      "--fidelity-chunk", "128", "--chunk", "256", "--json", str(out), "--plot",
                      str(tmp_path / "eval.png"), "--no-progress")
    assert run(args) == 0
    report = capsys.readouterr().out
    assert "Tasks" in report and "Fidelity against dense" in report and "Needle recall" in report
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert [m["method"] for m in result["methods"]] == ["dense", "hylra"]
    by_method = {}
    for s in result["samples"]:
        by_method.setdefault(s["method"].split()[0], []).append(s)
        assert s["prompt_tokens"] <= 640 - 12
    assert all(s["attended"] == 1.0 for s in by_method["dense"])
    assert all(0.5 < s["attended"] < 0.95 for s in by_method["hylra"])  # layers 0, 1 dense, 2, 3 sparse
    assert all(s["attended_decode"] < s["attended"] for s in by_method["hylra"])  # prompt tiles see their chunk
    dense_diag = by_method["dense"][0]["diagnosis"]["summary"]
    assert dense_diag["prompt"]["recall"] == 1.0 and dense_diag["decode"]["recall"] == 1.0
    # every layer and query head is reported (4 layers; hylra's default plan keeps the first two dense)
    layers = by_method["hylra"][0]["diagnosis"]["layers"]
    assert [row["layer"] for row in layers] == [0, 1, 2, 3] and len(layers[2]["heads"]) == 4
    assert [row["mode"] for row in layers] == ["full", "full", "compute", "compute"]
    assert all(h["prompt"]["recall"] == 1.0 for row in layers[:2] for h in row["heads"])
    (fid,) = result["fidelity"]
    assert fid["tokens"] == 640 and 0.0 <= fid["top1_agreement"] <= 1.0 and fid["kl_mean"] >= 0.0
    assert fid["attended"] < 1.0 and fid["decoded"] == 64 and fid["attended_decode"] < 1.0


def test_reference_reuses_dense_answers_of_an_earlier_run(tiny, tmp_path, monkeypatch, capsys):
    from longserve.evals import run as eval_run

    common = ["--model", str(tiny), "--lengths", "512", "--depths", "0.5", "--tasks", "passkey", "--samples", "2",
              "--no-fidelity", "--chunk", "256", "--no-progress"]
    first = tmp_path / "first.json"
    assert eval_run.run(_eval_args(*common, "--attention", "dense", "--json", str(first))) == 0
    built = []
    real_build = eval_run.build_engine
    monkeypatch.setattr(eval_run, "build_engine", lambda args, method, *a, **k: built.append(method) or
                        real_build(args, method, *a, **k))
    second = tmp_path / "second.json"
    assert eval_run.run(_eval_args(*common, "--attention", "hylra", "--attention-config",
                                   '{"hylra": {"topk_tokens": 64}}', "--reference", str(first),
                                   "--json", str(second))) == 0
    assert built == ["hylra"]  # dense did not run again
    earlier, result = json.loads(first.read_text()), json.loads(second.read_text())
    assert [m["label"] for m in result["methods"]] == ["dense", "hylra [topk_tokens=64]"]
    assert [r for r in result["samples"] if r["method"] == "dense"] == earlier["samples"]
    assert len([r for r in result["samples"] if r["method"] != "dense"]) == 2
    assert "dense" in capsys.readouterr().out
    for extra, needle in ((["--seed", "1"], "other seed"), ([], "--no-fidelity")):
        argv = [a for a in common if a != "--no-fidelity" or extra] + extra
        with pytest.raises(eval_run.EvalError, match=needle):
            eval_run.run(_eval_args(*argv, "--attention", "hylra", "--reference", str(first)))


def _fidelity_against_dense(tiny, hylra_params: dict, tokens: int, seed: int, **kwargs) -> dict:
    """run_fidelity of dense and one HyLRA variant on the tiny model over random token ids."""
    from longserve.evals.run import build_engine, run_fidelity

    args = _eval_args("--model", str(tiny), "--attention", "hylra")
    probes = {}
    for method, params in (("dense", {}), ("hylra", hylra_params)):
        llm, probe, label = build_engine(args, method, params, 1024)
        probes[label] = probe
    ids = [random.Random(seed).randrange(3, 200) for _ in range(tokens)]
    runner = llm.engine.runner
    (fid,) = run_fidelity(runner.model, runner.block_size, probes, ids, progress=False, **kwargs)
    return fid


def test_fidelity_of_a_budget_covering_everything_is_exact(tiny):
    fid = _fidelity_against_dense(tiny, {"topk_tokens": 4096}, 300, 0, chunk=64, skip=32, decode=20)
    assert fid["decoded"] == 20 and fid["kl_mean_decode"] < 1e-6 and fid["top1_agreement_decode"] == 1.0
    assert fid["kl_mean"] < 1e-6 and fid["top1_agreement"] == 1.0
    assert fid["ppl"] == pytest.approx(fid["ppl_dense"], rel=1e-5)
    assert fid["attended"] == pytest.approx(1.0)


@pytest.mark.parametrize("argv, needle", [
    (["--lengths", "2Q"], "--lengths"),
    (["--attention", "nope"], "unknown attention method"),
    (["--depths", "1.5"], "expected a number in [0, 1]"),
    (["--tasks", "passkey,bogus"], "unknown task"),
    (["--attention-config", "{not json"], "not valid JSON"),
    (["--attention-config", "{\"hylra\": []}"], "non-empty lists"),
    (["--attention", "hylra", "--attention-config", '{"routing": {"window": 64}}'], "not in --attention"),
])
def test_bad_flags_give_one_line_and_a_nonzero_exit(argv, needle, capsys):
    from longserve.server.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", *argv])
    assert exc.value.code != 0
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_a_model_that_does_not_load_is_one_line(tmp_path, capsys):
    from longserve.server.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(tmp_path / "missing"), "--no-progress"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "not found" in err and len(err.splitlines()) == 1


# -- the probe reads exactly what each method attended ---------------------------------------------------------
@pytest.mark.parametrize("method, params", [
    ("hylra", {"topk_tokens": 64, "prefill_tile": 32, "per_head": False, "prefill": "sparse"}),
    ("hylra", {"topk_tokens": 64, "per_head": True, "prefill": "sparse"}),
    ("routing", {"segment_tokens": 128, "tokens_per_cluster": 16, "budget_tokens": 48, "window": 32,
                 "sink_tokens": 4, "prefill_tile": 32, "prefill": "sparse"}),
    ("superlinear", {"sw_index": 11, "prefill": "sparse"}),
    ("superlinear", {"sw_index": 11, "prefill": "dense"}),
    ("superlinear", {"sw_index": 11, "sink_tokens": 8, "prefill": "sparse"}),
    pytest.param("superlinear", {"sw_index": 11, "sink_tokens": 8, "prefill": "sparse", "impl": "triton"},
                 marks=pytest.mark.slow, id="superlinear-triton"),  # the Triton interpreter without CUDA
])
def test_key_sets_reproduce_each_methods_output(method, params):
    """Softmax attention restricted to the probe's key set of every query and head equals the method's own
    output (union combine), in chunked prefill and in decode: the probe counts exactly what was attended."""
    from longserve.engine.testing import make_caches, single_sequence_metadata
    from longserve.evals.probe import selected_keys
    from longserve.kernels.base import StepState
    from longserve.kernels.plan import AttentionPlan
    from longserve.kernels.registry import build_backend

    hq, hkv, d, bs = 4, 2, 16, 16
    n = 300 if params.get("impl") == "triton" else 400
    backend = build_backend(plan=AttentionPlan.uniform(method, 1, params), impl="torch")
    probe = SelectionProbe(backend)
    cfg = type("C", (), {"num_layers": 1, "num_kv_heads": hkv, "head_dim": d})()
    caches = make_caches(cfg, n // bs + 1, bs, torch.float32, "cpu", backend.aux_specs(hkv, d))
    gen = torch.Generator().manual_seed(1)
    k, v, q = (torch.randn(n, h, d, generator=gen) for h in (hkv, hkv, hq))
    table = list(range(n // bs + 1))
    steps = [(s, min(n - 3, s + 128)) for s in range(0, n - 3, 128)] + [(p, p + 1) for p in range(n - 3, n)]
    checked = 0
    for start, end in steps:
        meta = single_sequence_metadata(table, start, end, bs)
        state = StepState()
        out = probe.forward(0, q[start:end], k[start:end], v[start:end], caches[0], meta, state)
        sparse = params.get("prefill") != "dense" or end - start == 1
        if not sparse:
            assert 0 not in state.selections or end - start == 1
            continue
        for row in selected_keys(state.selections[0], meta):
            for pos in range(row.first_pos, row.last_pos + 1):
                sets = row.key_sets(pos)
                for h in range(hq):
                    keys = sets[h * len(sets) // hq]
                    keys = keys[keys <= pos].long()
                    g = h // (hq // hkv)
                    w = torch.softmax(k[keys, g] @ q[pos, h] * d ** -0.5, 0)
                    torch.testing.assert_close(out[pos - start, h], w @ v[keys, g], atol=2e-5, rtol=1e-4)
                    checked += 1
    assert checked >= 4 * 3  # at least the decode steps
    share = probe.attended_share(0)
    assert 0.05 < share < 1.0


def test_a_fidelity_text_too_short_is_refused_before_anything_runs(tiny, tmp_path, capsys):
    from longserve.server.cli import main

    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--model", str(tiny), "--attention", "hylra", "--lengths", "512",
              "--fidelity-text", str(short), "--no-tasks", "--no-progress"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert "fewer than the length 512" in err and len(err.splitlines()) == 1


def test_verdict_locates_a_miss():
    from longserve.evals.run import verdict

    def summary(recall, within, beyond, reuse=0, needed=None):
        return {"decode": {"recall": recall, "recall_where_needed": needed, "missed_within_budget": within,
                           "missed_beyond_budget": beyond, "missed_in_reuse_layers": reuse}}

    assert verdict(True, True, summary(0.0, 9, 9)) == "ok"
    assert verdict(False, False, summary(0.0, 9, 9)) == "model"  # dense misses it too
    assert verdict(False, True, summary(0.3, 10, 2, needed=0.95)) == "prefill"  # kept where it was needed
    assert verdict(False, True, summary(1.0, 0, 0)) == "prefill"
    assert verdict(False, True, summary(0.2, 10, 2)) == "search"
    assert verdict(False, True, summary(0.2, 2, 10)) == "budget"
    assert verdict(False, True, summary(0.2, 6, 2, reuse=5)) == "selection"


def test_attention_config_variants_run_side_by_side():
    from longserve.evals.run import EvalError, method_label, method_runs

    args = _eval_args("--attention", "routing,hylra",
                      "--attention-config", '{"hylra": [{"topk_tokens": 512}, {"topk_tokens": 256}]}')
    assert method_runs(args) == [("dense", {}, None), ("routing", {}, None), ("hylra", {"topk_tokens": 512}, None),
                                 ("hylra", {"topk_tokens": 256}, None)]
    labels = {method_label(m, p, False) for m, p, _ in method_runs(args)}
    assert len(labels) == 4
    flat = _eval_args("--attention", "hylra,routing", "--attention-config", '{"prefill": "dense"}')
    assert method_runs(flat)[1:] == [("hylra", {"prefill": "dense"}, None), ("routing", {"prefill": "dense"}, None)]
    with pytest.raises(EvalError, match="not in --attention"):
        method_runs(_eval_args("--attention", "hylra", "--attention-config", '{"routing": [{"window": 64}]}'))


def test_a_policy_goes_to_the_method_it_names(tmp_path):
    from longserve.evals.run import EvalError, method_runs
    from longserve.kernels.plan import AttentionPlan

    policy = tmp_path / "p.json"
    AttentionPlan.default("hylra", 4, {"topk_tokens": 64}).save(policy)
    runs = method_runs(_eval_args("--attention", "hylra,routing", "--policy", str(policy)))
    assert runs == [("dense", {}, None), ("hylra", {}, str(policy)), ("routing", {}, None)]
    with pytest.raises(EvalError, match="not in --attention"):
        method_runs(_eval_args("--attention", "routing", "--policy", str(policy)))


def test_fidelity_with_dense_prefill_is_exact_in_prefill_and_sparse_in_decode(tiny):
    fid = _fidelity_against_dense(tiny, {"topk_tokens": 32, "prefill": "dense"}, 400, 1, chunk=128, skip=64,
                                  decode=16)
    assert fid["kl_mean"] < 1e-6 and fid["top1_agreement"] == 1.0  # the prompt chunks attend densely
    # the decode steps do not: they attend fewer keys and their logits are not dense's bit for bit (on this tiny
    # random model the difference is at rounding level, so its sign says nothing)
    assert fid["attended_decode"] < 0.9 and fid["kl_mean_decode"] != 0.0

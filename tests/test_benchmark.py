"""`benchmark`: JSON fields, MFU by both formulas against hand computations, measured peak
memory against the planner's prediction (in one process and on 2 spawned ranks), and the
transformers comparison. Throughput values are not asserted (shared, noisy CPU)."""

from __future__ import annotations

import json

import pytest

from megatron_llama.bench.planner import PlanLayout, memory_per_gpu
from megatron_llama.model.config import LlamaConfig
from megatron_llama.parallel import ParallelLayout

# dim 256, 4 layers, 4 heads, FFN 704, vocab 4096: activations dominate the step's memory
CFG = LlamaConfig(dim=256, n_layers=4, n_heads=4, vocab_size=4096, multiple_of=32,
                  max_seq_len=256)
SEQ, MICRO = 256, 4
# By hand: N without input embedding = 4 layers x (4*256^2 + 3*256*704 + 2*256) + 256
# (final norm) + 4096*256 (output) = 4,262,144; attention 4*4*64*256 = 262,144 per token.
PALM_FLOPS = 6 * 4_262_144 + 12 * 262_144            # 28,718,592
MEGATRON_FLOPS = 6 * 4_262_144 + 6 * 262_144         # 27,145,728
# Measured peak tensor memory (torch's allocator) vs planner, fp32: within +-15 %.
MEMORY_TOLERANCE = 0.15


def _bench(**kw):
    from megatron_llama.bench.benchmark import BenchConfig

    kw.setdefault("layout", ParallelLayout())
    return BenchConfig(model=CFG, seq_length=SEQ, micro_batch=MICRO, warmup=1, iters=2,
                       threads=2, **kw)


def _predicted(report, rc, tp=1, sp=False, pp=1):
    lay = PlanLayout(tp=tp, pp=pp, sp=sp, micro_batch=MICRO, recompute=rc)
    return memory_per_gpu(CFG, lay, SEQ, report["layout"]["microbatches"], param_bytes=4).total


@pytest.mark.slow
def test_benchmark_report_mfu_memory_and_transformers(megatron_single, tmp_path):
    from megatron_llama.bench.benchmark import run_benchmark
    from megatron_llama.bench.report import format_report, write_json

    report = run_benchmark(_bench(compare_hf=True))
    write_json(report, str(tmp_path / "b.json"))
    r = json.loads((tmp_path / "b.json").read_text())
    for key in ("tokens_per_s_per_gpu", "tflops_per_gpu", "mfu", "step_time_s", "memory",
                "layout", "formulas", "peak_tflops_per_gpu", "peak_source", "transformers"):
        assert key in r, key
    assert {"mean", "median", "p90"} <= set(r["step_time_s"])
    assert r["layout"]["tp"] == 1 and r["layout"]["global_batch"] == MICRO
    assert r["flops_per_token"] == {"palm": PALM_FLOPS, "megatron_causal": MEGATRON_FLOPS}
    tok = MICRO * SEQ / r["step_time_s"]["mean"]
    assert r["tokens_per_s_per_gpu"] == pytest.approx(tok)
    peak = r["peak_tflops_per_gpu"]
    assert 0 < peak == pytest.approx(max(r["gemm_tflops"]["windows_rank0"]))
    assert r["mfu"]["palm"] == pytest.approx(tok * PALM_FLOPS / 1e12 / peak)
    assert r["mfu"]["megatron_causal"] == pytest.approx(tok * MEGATRON_FLOPS / 1e12 / peak)
    hf = r["transformers"]
    assert hf["tokens_per_s"] > 0 and 7 < hf["loss"] < 10  # ln(4096) = 8.3 at the start
    assert hf["ratio_ours_over_transformers"] == pytest.approx(r["tokens_per_s"] / hf["tokens_per_s"])
    assert 7 < r["loss"] < 10
    text = format_report(r)
    assert "ours / transformers" in text and "this model's own GEMMs alone" in text
    # the model's GEMMs timed alone, and one profiled step split by kind
    g = r["gemm_tflops"]
    assert g["model_shapes"] > 0
    assert g["palm_fraction_of_model_shapes"] == pytest.approx(r["tflops_per_gpu"]["palm"] /
                                                               g["model_shapes"])
    b = r["time_breakdown_rank0"]
    assert set(b["self_s"]) == {"GEMMs", "attention", "optimizer", "communication", "other"}
    assert b["self_s"]["GEMMs"] > 0 and b["self_s"]["attention"] > 0
    assert b["self_s"]["optimizer"] > 0 and b["gemm_tflops_in_step"] > 0
    # self times partition the profiled step (one thread runs forward, backward, optimizer)
    assert 0.5 * b["wall_s"] < sum(b["self_s"].values()) <= 1.05 * b["wall_s"]
    top = list(b["top_other_s"].values())
    assert len(top) == 5 and top == sorted(top, reverse=True)
    assert sum(top) <= b["self_s"]["other"] + 1e-9
    assert "most of other:" in text
    measured = r["memory"]["peak_tensor_gb_per_rank"][0] * 1e9
    assert measured == pytest.approx(_predicted(r, "none"), rel=MEMORY_TOLERANCE)
    # static part: 4 + 4 (fp32 grad buffer) + 8 (Adam) bytes per parameter (+ 4-byte steps)
    assert r["memory"]["static_tensor_gb_per_rank"][0] * 1e9 == pytest.approx(
        16 * CFG.num_params(), abs=1024)


@pytest.mark.slow
def test_full_recompute_memory_matches_planner(megatron_single):
    from megatron_llama.bench.benchmark import run_benchmark

    r = run_benchmark(_bench(recompute="full"))
    measured = r["memory"]["peak_tensor_gb_per_rank"][0] * 1e9
    assert measured == pytest.approx(_predicted(r, "full"), rel=MEMORY_TOLERANCE)
    assert _predicted(r, "full") < 0.8 * _predicted(r, "none")


@pytest.mark.multiprocess
def test_two_rank_tp_sp_benchmark_memory(tmp_path):
    """TP=2 + SP on 2 spawned ranks: per-rank memory, the slowest rank's step time."""
    from megatron_llama.bench.benchmark import run_benchmark

    r = run_benchmark(_bench(layout=ParallelLayout(tp=2, sp=True)))
    assert r["layout"]["world"] == 2 and r["layout"]["sp"]
    for gb in r["memory"]["peak_tensor_gb_per_rank"]:
        assert gb * 1e9 == pytest.approx(_predicted(r, "none", tp=2, sp=True),
                                         rel=MEMORY_TOLERANCE)


def test_benchmark_refuses_illegal_layouts():
    from megatron_llama.cli import main

    assert main(["benchmark", "--preset", "tiny", "--tp", "3"]) == 2        # 4 heads
    assert main(["benchmark", "--preset", "tiny", "--sp"]) == 2             # SP needs TP
    assert main(["benchmark", "--preset", "tiny", "--tp", "2", "--compare-hf"]) == 2


def test_step_gemms_count_every_weight_flop_exactly():
    """6 x (matmul parameters) x tokens: every weight multiplied forward, by the input
    gradient and by the weight gradient; TP shards the shapes, GQA shrinks K and V."""
    from megatron_llama.bench.gemm_ceiling import step_gemms

    gqa = LlamaConfig(dim=256, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=4096,
                      multiple_of=32, max_seq_len=256)
    for cfg in (CFG, gqa):
        # matmul weights = parameters without input embedding, without the norms' weights
        weights = cfg.num_params(include_embedding=False) - (2 * cfg.n_layers + 1) * cfg.dim
        tokens = MICRO * SEQ
        full = step_gemms(cfg, tp=1, micro_batch=MICRO, seq_length=SEQ, microbatches=3)
        assert sum(g.flops for g in full) == 6 * weights * tokens * 3
        tp2 = step_gemms(cfg, tp=2, micro_batch=MICRO, seq_length=SEQ, microbatches=3)
        assert 2 * sum(g.flops for g in tp2) == sum(g.flops for g in full)
        assert {g.layout for g in full} == {"NT", "NN", "TN"}
    # the three products of the QKV projection: forward, input grad, weight grad
    fwd, dgrad, wgrad = step_gemms(gqa, tp=1, micro_batch=1, seq_length=8)[:3]
    n_qkv = (8 + 2 * 2) * 32
    assert [(g.m, g.k, g.n, g.layout) for g in (fwd, dgrad, wgrad)] == [
        (8, 256, n_qkv, "NT"), (8, n_qkv, 256, "NN"), (n_qkv, 8, 256, "TN")]
    # a vocabulary that megatron-core pads (4001 -> 4032 at TP=1, 4032 at TP=2): the output
    # layer multiplies the padded rows too
    odd = LlamaConfig(dim=128, n_layers=1, n_heads=2, vocab_size=4001, multiple_of=32,
                      max_seq_len=64)
    weights = odd.num_params(include_embedding=False) - 3 * odd.dim
    out = [g for g in step_gemms(odd, tp=2, micro_batch=1, seq_length=64) if "output" in g.name]
    assert {g.n if g.layout == "NT" else g.m if g.layout == "TN" else g.k for g in out} == {2016}
    assert sum(g.flops for g in step_gemms(odd, tp=1, micro_batch=1, seq_length=64)) == \
        6 * 64 * (weights + (4032 - 4001) * 128)


def test_measured_gemm_rate_is_flops_over_time():
    from megatron_llama.bench.gemm_ceiling import Gemm, measure_step_gemms

    gemms = [Gemm("a", 64, 32, 48, layout, count) for layout, count in
             (("NT", 2), ("NN", 1), ("TN", 3))]
    m = measure_step_gemms(gemms, repeats=2)
    assert m["tflops"] == pytest.approx(sum(g.flops for g in gemms) / m["seconds"] / 1e12)
    assert [p["layout"] for p in m["per_gemm"]] == ["NT", "NN", "TN"]


def test_gemm_operands_are_stored_as_megatron_core_multiplies():
    """NT: the weight is read transposed (x @ W.t()); NN: both as stored (g @ W); TN: the
    gradient transposed (g.t() @ x). Shapes [m, k] x [k, n] in every layout."""
    from megatron_llama.bench.gemm_ceiling import Gemm, _operands

    for layout, a_contig, b_contig in (("NT", True, False), ("NN", True, True),
                                       ("TN", False, True)):
        a, b, out = _operands(Gemm("g", 6, 4, 5, layout, 1))
        assert (a.shape, b.shape, out.shape) == ((6, 4), (4, 5), (6, 5))
        assert (a.is_contiguous(), b.is_contiguous()) == (a_contig, b_contig), layout


@pytest.mark.slow
def test_sweep_writes_csv_chart_and_table(megatron_single, tmp_path, capsys):
    """`--sweep`: every point in the CSV (skipped ones with the reason), a PNG, a summary."""
    import csv

    from megatron_llama.cli import main

    out = tmp_path / "sweep"
    assert main(["benchmark", "--preset", "tiny", "--dim", "128", "--n-layers", "2",
                 "--n-heads", "2", "--vocab-size", "1024", "--seq-length", "64",
                 "--micro-batch", "2", "--warmup", "1", "--iters", "1", "--sweep",
                 "--sweep-tp", "1", "2", "--sweep-pp", "1", "--sweep-recompute", "none", "full",
                 "--max-procs", "1", "--output", str(out)]) == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["label"] for r in rows] == ["TP1 PP1 none mb2", "TP1 PP1 full mb2",
                                          "TP2 PP1 none mb2", "TP2 PP1 full mb2"]
    ran, skipped = rows[:2], rows[2:]
    assert all(float(r["tokens_per_s_per_gpu"]) > 0 and not r["error"] for r in ran)
    assert [r["recompute"] for r in ran] == ["none", "full"]
    # full recompute keeps only layer inputs: less peak memory than none
    assert float(ran[1]["peak_tensor_gb_max"]) < float(ran[0]["peak_tensor_gb_max"])
    assert all("needs 2 processes > --max-procs 1" in r["error"] for r in skipped)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    table = text[text.index("tok/s/rank"):].splitlines()
    assert table[1].startswith("TP1 PP1 none mb2") and table[1].split()[4] == "1"  # ranks
    assert table[4].startswith("TP2 PP1 full mb2") and "skipped: needs 2 processes" in table[4]

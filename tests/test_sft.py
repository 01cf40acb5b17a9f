"""Fine-tuning batches: the response-only loss by hand, and packed rows (block-diagonal
attention) training exactly like the same examples unpacked, in one process, TP=2 and PP=2."""

from __future__ import annotations

import pytest
import torch

from megatron_llama.model.config import LlamaConfig
from tests.llama_testing import random_meta_weights, reference_logits, rel_err

SEQ, MICRO, N_EXAMPLES, VOCAB = 160, 2, 12, 512


@pytest.fixture(scope="module")
def examples_prefix(tmp_path_factory):
    from megatron_llama.data.corpus import build_builtin_corpus, pydoc_documents
    from megatron_llama.data.finetune_data import finetune_data
    from megatron_llama.data.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("sft")
    corpus = build_builtin_corpus(str(d / "corpus"), max_code_bytes=1 << 14)
    text = d / "prose.txt"
    text.write_text("\n".join(p["text"] for p in pydoc_documents()))
    model = train_tokenizer([str(text)], str(d / "tok"), vocab_size=VOCAB)
    finetune_data([corpus["alpaca"], corpus["chat"]], str(d / "sft"), model, max_tokens=SEQ + 1,
                  overlong="drop", progress=False)
    return str(d / "sft")


def config(vocab):
    return LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                       multiple_of=16, max_seq_len=SEQ)


def weights(cfg):
    """Random weights with sharp attention (q, k scaled up), so that attending across
    examples would change the loss well beyond the tolerance (see the last test)."""
    w = random_meta_weights(cfg, seed=3)
    for k in w:
        if k.endswith(("attention.wq.weight", "attention.wk.weight")):
            w[k] = w[k] * 4
    return w


def picked(examples):
    """Short chat examples and long Alpaca ones, to pack together."""
    order = sorted(range(len(examples)), key=lambda i: (int(examples.lengths[i]), i))
    half = N_EXAMPLES // 2
    return sorted(order[:half] + order[-half:])


def sft_case(prefix, layout, packed, relabel=False):
    """Loss [sum, count] (last stage) and Meta-named-ready gradient shards of one batch."""
    from megatron.core import parallel_state as ps

    from megatron_llama.data.sft import SFTExamples, microbatches, plan_rows
    from megatron_llama.model.build import build_model, load_meta_state_dict, local_shards
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.parallel import destroy, initialize
    from megatron_llama.training.engines.megatron_core import forward_backward, wrap_ddp

    examples = SFTExamples(prefix)
    cfg = config(VOCAB)  # the tokenizer's vocabulary
    rows = plan_rows(examples, picked(examples), SEQ, packed=packed)
    batches = microbatches(examples, rows, SEQ, MICRO)
    if relabel:  # a prompt position's label changed: nothing may change
        b = batches[0]
        prompt = (b["loss_mask"] == 0).nonzero()[0]
        b["labels"][prompt[0], prompt[1]] = (b["labels"][prompt[0], prompt[1]] + 7) % VOCAB
    initialize(layout, seed=0)
    try:
        tconfig = to_transformer_config(cfg, layout, calculate_per_token_loss=True)
        chunks = build_model(cfg, tconfig)
        load_meta_state_dict(chunks, weights(cfg), cfg)
        chunks = wrap_ddp(chunks, tconfig)
        losses = forward_backward(chunks, tconfig, batches, seq_length=SEQ,
                                  micro_batch_size=MICRO)
        total = torch.stack(losses).sum(0) if losses else None
        return {"loss": total, "grads": local_shards(chunks, grads=True),
                "rows": len(rows), "dp_rank": ps.get_data_parallel_rank()}
    finally:
        destroy()


def to_meta(shards, layout):
    from megatron_llama.model.canonical import megatron_to_meta

    return megatron_to_meta(shards, config(VOCAB), tp=layout.tp, pp=layout.pp, vp=layout.vp)


def test_response_only_loss_equals_a_hand_computation(examples_prefix, megatron_single):
    """The loss of one example is the mean cross entropy over its response tokens only."""
    from megatron_llama.data.sft import SFTExamples
    from megatron_llama.parallel import ParallelLayout

    examples = SFTExamples(examples_prefix)
    i = picked(examples)[3]
    ids, mask = examples.example(i)
    cfg = config(VOCAB)
    logits = reference_logits(weights(cfg), cfg,
                              torch.from_numpy(ids[:-1])[None])[0]
    ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[1:]), reduction="none")
    m = torch.from_numpy(mask[1:]).float()
    assert 0 < m.sum() < len(m)  # a prompt and a response
    by_hand = (ce * m).sum()

    from megatron_llama.data.sft import microbatches, plan_rows

    rows = plan_rows(examples, [i], SEQ, packed=False)
    batch = microbatches(examples, rows, SEQ, 1)[0]
    assert torch.equal(batch["loss_mask"][0, :len(m)], m)
    single = sft_case_single(examples_prefix, [i])
    assert single[1] == m.sum()
    assert abs(single[0] - by_hand.item()) <= 1e-5 * abs(by_hand.item())
    # changing a prompt token's label changes neither the loss nor a gradient
    base = sft_case(examples_prefix, ParallelLayout(), packed=True)
    moved = sft_case(examples_prefix, ParallelLayout(), packed=True, relabel=True)
    assert torch.equal(base["loss"], moved["loss"])
    assert all(torch.equal(base["grads"][k][n], moved["grads"][k][n])
               for k in base["grads"] for n in base["grads"][k])


def sft_case_single(prefix, indices):
    """(loss sum, count) of ``indices`` unpacked, one process, through the model's forward."""
    from megatron_llama.data.sft import SFTExamples, microbatches, plan_rows
    from megatron_llama.model.build import build_model, load_meta_state_dict
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.parallel import ParallelLayout, destroy, initialize
    from megatron_llama.training.engines.megatron_core import per_token_lm_loss

    examples = SFTExamples(prefix)
    cfg = config(VOCAB)
    batch = microbatches(examples, plan_rows(examples, indices, SEQ, packed=False), SEQ, 1)[0]
    initialize(ParallelLayout(), seed=0)
    try:
        model = build_model(cfg, to_transformer_config(cfg, ParallelLayout()))[0]
        load_meta_state_dict([model], weights(cfg), cfg)
        with torch.no_grad():
            out = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                        labels=batch["labels"])
        total, count, _ = per_token_lm_loss(out, batch["loss_mask"])
        return total.item(), count.item()
    finally:
        destroy()


def sft_worker(rank, world, workdir, prefix):
    from megatron_llama.parallel import ParallelLayout, init_distributed

    init_distributed()
    return {f"{name}-{mode}": sft_case(prefix, layout, packed=mode == "packed")
            for name, layout in (("TP2", ParallelLayout(tp=2)), ("PP2", ParallelLayout(pp=2)))
            for mode in ("packed", "unpacked")}


@pytest.mark.multiprocess
def test_packed_rows_train_like_unpacked_examples(examples_prefix, tmp_path):
    from megatron_llama.data.sft import SFTExamples, packing_efficiency, plan_rows
    from megatron_llama.local_ranks import run_processes
    from megatron_llama.parallel import ParallelLayout, init_distributed

    examples = SFTExamples(examples_prefix)
    packed_rows = plan_rows(examples, picked(examples), SEQ, packed=True)
    unpacked_rows = plan_rows(examples, picked(examples), SEQ, packed=False)
    assert len(packed_rows) < len(unpacked_rows)  # packing saves rows
    eff = packing_efficiency(examples, packed_rows, SEQ)
    assert eff > packing_efficiency(examples, unpacked_rows, SEQ)
    print(f"packing efficiency {eff:.3f} ({len(packed_rows)} rows for {N_EXAMPLES} examples)")

    init_distributed()
    reference = {mode: sft_case(examples_prefix, ParallelLayout(), packed=mode == "packed")
                 for mode in ("packed", "unpacked")}
    ref_grads = {mode: to_meta(r["grads"], ParallelLayout()) for mode, r in reference.items()}
    # packed == unpacked in one process: the same loss sum and count, the same gradients
    assert reference["packed"]["loss"][1] == reference["unpacked"]["loss"][1]
    assert rel_err(reference["packed"]["loss"], reference["unpacked"]["loss"]) <= 1e-5
    for name, g in ref_grads["unpacked"].items():
        assert rel_err(ref_grads["packed"][name], g) <= 1e-5, name

    # the test can fail: attention across the packed examples moves the loss far more
    import megatron_llama.data.sft as sft

    original = sft.row_batch

    def leaky(*args, **kwargs):
        batch = original(*args, **kwargs)
        causal = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)
        batch["attention_mask"] = causal.expand_as(batch["attention_mask"]).clone()
        return batch

    sft.row_batch = leaky
    try:
        leaked = sft_case(examples_prefix, ParallelLayout(), packed=True)["loss"]
    finally:
        sft.row_batch = original
    assert rel_err(leaked, reference["unpacked"]["loss"]) > 3e-4  # 30x the tolerance

    results = run_processes(sft_worker, 2, str(tmp_path), examples_prefix, timeout=600)
    for case in ("TP2-packed", "TP2-unpacked", "PP2-packed", "PP2-unpacked"):
        layout = ParallelLayout(tp=2) if case.startswith("TP2") else ParallelLayout(pp=2)
        loss = [r[case]["loss"] for r in results if r[case]["loss"] is not None][0]
        assert rel_err(loss, reference["unpacked"]["loss"]) <= 1e-5, case
        shards = {}
        for r in results:
            shards.update(r[case]["grads"])
        grads = to_meta(shards, layout)
        for name, g in ref_grads["unpacked"].items():
            assert rel_err(grads[name], g) <= 1e-5, (case, name)


def test_thd_input_matches_the_packed_rows(examples_prefix):
    """The GPU path's THD form of a packed microbatch: rows flattened to one sequence whose
    cu_seqlens boundaries are exactly where positions restart (every example, then each
    row's padding tail), with the longest span as max_seqlen."""
    from megatron_llama.data.sft import SFTExamples, microbatches, plan_rows
    from megatron_llama.training.engines.megatron_core import thd_batch

    examples = SFTExamples(examples_prefix)
    rows = plan_rows(examples, picked(examples), SEQ, packed=True)
    batch = microbatches(examples, rows, SEQ, MICRO)[0]
    tokens, labels, mask, positions, params = thd_batch(batch)
    assert tokens.shape == labels.shape == mask.shape == positions.shape == (1, MICRO * SEQ)
    assert torch.equal(tokens[0], batch["tokens"].reshape(-1))
    cu = params.cu_seqlens_q
    assert params.qkv_format == "thd" and torch.equal(cu, params.cu_seqlens_kv)
    assert cu[0] == 0 and cu[-1] == MICRO * SEQ and bool((cu[1:] > cu[:-1]).all())
    spans = (cu[1:] - cu[:-1]).tolist()
    assert params.max_seqlen_q == max(spans)
    restarts = (positions[0] == 0).nonzero().flatten()
    assert torch.equal(restarts, cu[:-1].long())
    n_examples = sum(len(batch_row) for batch_row in rows[:MICRO])
    assert len(spans) >= n_examples and len(spans) <= n_examples + MICRO

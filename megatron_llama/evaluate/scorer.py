"""Log-likelihoods and greedy continuations from a model sharded over TP x PP ranks.

Rank 0 decides what to compute (it talks to lm-evaluation-harness); every other rank runs
`Scorer.serve`, receiving each batch from rank 0 (one `broadcast_object_list`) and taking
its part in the same forward: megatron-core's schedule for the layout, forward-only, with
the output layer run on the scored positions only (a forward pre-hook picks them from the
hidden states) and its vocabulary-parallel logits gathered over TP on the last stage, which
turns them into scores and sends those to rank 0. Every forward is a collective, so all ranks
see the same batches in the same order.

A scoring row is ``(tokens, n)``: the log-probability of the last ``n`` tokens of
``tokens`` given the ones before, and whether each of them is the argmax (greedy). Rows
with the same inputs (all tokens but the last) share one forward; forwards are sorted by
length (longest first, as lm-eval's own backends do), cut into batches padded to their
longest row (``batch_size`` rows of the longest length, more of shorter ones in the same
number of tokens), and unsorted on return.
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import torch

STOP, SCORE = "stop", "score"


class Scorer:
    """Scores rows on this rank's model chunks (see the module doc)."""

    def __init__(self, chunks: list, cfg, tconfig, batch_size: int = 16):
        from megatron.core import parallel_state as ps

        self.chunks, self.cfg, self.tconfig, self.batch_size = chunks, cfg, tconfig, batch_size
        self.rank = torch.distributed.get_rank()
        # the rank that holds the loss-stage outputs to send: last stage, TP rank 0
        self.last = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
        self.last_global = self._last_rank()
        for chunk in chunks:
            chunk.eval()

    @staticmethod
    def _last_rank() -> int:
        from megatron.core import parallel_state as ps

        flag = torch.tensor([torch.distributed.get_rank() if ps.is_pipeline_last_stage()
                             and ps.get_tensor_model_parallel_rank() == 0 else -1])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    # ---- rank 0 ------------------------------------------------------------------------
    def score(self, rows: Sequence[tuple[Sequence[int], int]],
              progress=None) -> list[tuple[float, bool]]:
        """(log-probability, greedy) of each row; called on rank 0 only.

        Rows whose inputs (all tokens but the last) are equal share one forward, as the
        choices of a multiple-choice question with one-token answers do (lm-eval's `hf`
        backend groups them the same way)."""
        groups: dict[tuple, list[int]] = {}
        for i, (ids, _) in enumerate(rows):
            groups.setdefault(tuple(ids[:-1]), []).append(i)
        items = sorted(groups.items(), key=lambda kv: -len(kv[0]))
        out: list[Optional[tuple[float, bool]]] = [None] * len(rows)
        for part in self._batches(items):
            batch = [(list(inputs), [(int(rows[i][0][-1]), int(rows[i][1])) for i in members])
                     for inputs, members in part]
            results = iter(self._run(batch))
            for _, members in part:
                for i in members:
                    out[i] = next(results)[:2]
            if progress is not None:
                progress.update(sum(len(m) for _, m in part))
        return out  # type: ignore[return-value]

    def _batches(self, items: list) -> list[list]:
        """Cut forward rows (sorted longest first) into batches: ``batch_size`` rows of the
        longest length, then as many shorter rows as fill the same number of tokens
        (rows x the batch's longest row), so short requests do not pay a forward each
        per ``batch_size`` of them and no batch holds more tokens than the first."""
        if not items:
            return []
        budget = self.batch_size * len(items[0][0])
        batches, start = [], 0
        while start < len(items):
            width, end = max(1, len(items[start][0])), start + 1
            while end < len(items) and (end - start + 1) * width <= budget:
                end += 1
            batches.append(items[start:end])
            start = end
        return batches

    def next_tokens(self, sequences: Sequence[Sequence[int]]) -> list[int]:
        """The argmax token after each sequence (one forward; rank 0 only)."""
        batch = [(list(seq), [(0, 1)]) for seq in sequences]
        return [int(r[2]) for r in self._run(batch)]

    def stop(self) -> None:
        """Release the other ranks from `serve` (rank 0, once, at the end)."""
        if torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list([STOP], src=0)

    def _run(self, batch: list) -> list[tuple]:
        if torch.distributed.get_world_size() > 1:
            torch.distributed.broadcast_object_list([(SCORE, batch)], src=0)
        return self._forward(batch)

    # ---- every other rank --------------------------------------------------------------
    def serve(self) -> None:
        """Follow rank 0's batches until it says stop (ranks other than 0)."""
        while True:
            message = [None]
            torch.distributed.broadcast_object_list(message, src=0)
            if message[0] == STOP:
                return
            _, batch = message[0]
            self._forward(batch)

    # ---- all ranks ---------------------------------------------------------------------
    def _forward(self, batch: list) -> list[tuple[float, bool, int]]:
        """One forward of ``batch`` on every rank; the scores end on rank 0.

        An item is (inputs, [(last target, n), ...]): one forward row, scored for each
        member as the row ``inputs + [last target]`` whose last n tokens count."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        width = max(len(t) for t, _ in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        for r, (inputs, _) in enumerate(batch):
            tokens[r, :len(inputs)] = torch.tensor(inputs)
        device = next(self.chunks[0].parameters()).device
        micro = {"tokens": tokens.to(device),
                 **{k: v.to(device) for k, v in _scored_positions(batch).items()}}
        iterator = [iter([micro]) for _ in self.chunks] if len(self.chunks) > 1 else iter([micro])
        with torch.no_grad():
            stored = get_forward_backward_func()(
                forward_step_func=partial(_forward_step, vocab=self.cfg.vocab_size),
                data_iterator=iterator,
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=1, seq_length=width, micro_batch_size=len(batch),
                forward_only=True)
        scores = stored[0]["scores"].tolist() if self.last and stored else None
        if self.last_global != 0:  # PP: the last stage is not rank 0 (every rank joins)
            holder = [scores]
            torch.distributed.broadcast_object_list(holder, src=self.last_global)
            scores = holder[0]
        if self.rank != 0:
            return []
        return [(float(lp), bool(g), int(nxt)) for lp, g, nxt in scores]


def _scored_positions(batch: list) -> dict[str, torch.Tensor]:
    """Index tensors for the positions a batch scores (host side, from the token lists).

    Only positions some member scores reach the output layer: row r's last ``widest``
    inputs (``widest`` = its members' largest n), N positions in all, in row order.
    ``row``/``col`` pick them from the [s, b, h] hidden states; for each scored token
    (T in all) ``flat`` is its position among the N, ``target`` the token it must predict
    and ``owner`` its member (M members); ``after`` is each member's row's last position
    among the N, whose argmax is the greedy next token."""
    row, col, flat, target, owner, after = [], [], [], [], [], []
    member = 0
    for r, (inputs, members) in enumerate(batch):
        length, widest = len(inputs), max(n for _, n in members)
        base = len(row)
        row += range(length - widest, length)
        col += [r] * widest
        for last, n in members:
            # position p predicts the token after it: inputs[p + 1], or `last` at the end
            for p in range(length - n, length):
                flat.append(base + p - (length - widest))
                target.append(inputs[p + 1] if p + 1 < length else last)
                owner.append(member)
            after.append(base + widest - 1)
            member += 1
    as_long = partial(torch.tensor, dtype=torch.long)
    return {"row": as_long(row), "col": as_long(col), "flat": as_long(flat),
            "target": as_long(target), "owner": as_long(owner), "after": as_long(after)}


def _output_layer(model):
    """The output layer in this model chunk, None on a stage without one."""
    for module in model.modules():
        if getattr(module, "post_process", False) and hasattr(module, "output_layer"):
            return module.output_layer
    return None


def _keep_positions(_module, args, kwargs, row, col):
    """Forward pre-hook of the output layer: [s, b, h] hidden states -> [N, 1, h], the
    scored positions only (megatron-core's inference path slices to the last token the
    same way); the logits come back as [1, N, V]."""
    return (args[0][row, col].unsqueeze(1),) + tuple(args[1:]), kwargs


def _forward_step(data_iterator, model, vocab: int):
    micro = next(data_iterator)
    tokens = micro["tokens"]
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    head = _output_layer(model)
    hook = None if head is None else head.register_forward_pre_hook(
        partial(_keep_positions, row=micro["row"], col=micro["col"]), with_kwargs=True)
    try:
        logits = model(tokens, positions, None, runtime_gather_output=True)
    finally:
        if hook is not None:
            hook.remove()
    return logits, partial(_scores, micro=micro, vocab=vocab)


def _scores(logits: torch.Tensor, micro: dict, vocab: int):
    """For each member: [sum of the log-probs of its last n targets, whether all are the
    argmax, the argmax after its row's last input], from the scored positions' logits
    [1, N, V_padded] (the vocabulary's padding entries dropped first). The fp32
    log-softmax runs over slices of positions, so a batch that scores every position
    (perplexity) never holds more than ~256 MB of it beside the logits."""
    flat, target, owner = micro["flat"], micro["target"], micro["owner"]
    positions = logits.shape[1]
    picked = torch.empty(flat.shape[0], dtype=torch.float64, device=logits.device)  # [T]
    best = torch.empty(positions, dtype=torch.long, device=logits.device)  # [N]
    step = max(1, (64 << 20) // vocab)  # positions per slice: 64M fp32 values
    for start in range(0, positions, step):
        logp = torch.log_softmax(logits[0, start:start + step, :vocab].float(), dim=-1)
        best[start:start + step] = logp.argmax(-1)
        inside = (flat >= start) & (flat < start + step)
        picked[inside] = logp[flat[inside] - start, target[inside]].double()
    members = len(micro["after"])
    total = torch.zeros(members, dtype=torch.float64, device=logits.device)
    total.index_add_(0, owner, picked)
    misses = torch.zeros(members, dtype=torch.long, device=logits.device)
    misses.index_add_(0, owner, (best[flat] != target).long())
    scores = torch.stack([total, (misses == 0).double(), best[micro["after"]].double()], dim=1)
    return torch.zeros((), device=logits.device), {"scores": scores.cpu()}

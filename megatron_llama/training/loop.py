"""The pretraining loop: one engine, the paper's schedule, logs, checkpoints, signals.

The loop knows one interface, `training.engines.base.Engine`: megatron-core's (DDP +
distributed optimizer + the layout's schedule) or DeepSpeed's ZeRO, both around the same
megatron-core model on the same data. Per iteration: run forward and
backward over the global batch's microbatches, agree on
the loss and on pending signals across all ranks (one small all-reduce), skip the update
(or stop) if the loss is not finite, otherwise advance the lr schedule and step the
optimizer. SIGTERM / SIGUSR1 (how SLURM warns before preemption) make every rank save a
checkpoint after the current step and exit cleanly.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from megatron_llama.errors import ConfigError, check_installed
from megatron_llama.model.config import to_transformer_config
from megatron_llama.resilience.lock import RunLock
from megatron_llama.training.engines.verified import remove_failed_saves
from megatron_llama.resilience.watchdog import Watchdog, injected_hang
from megatron_llama.training.recipe import (
    SCHEDULE_FIELDS,
    TrainConfig,
    describe_schedule,
    schedule_of,
)

_signal_received = {"value": 0}
# Fault injection for tests and drills (documented in the README):
SIGKILL_TEST_ENV = "MEGATRON_LLAMA_TEST_SIGKILL_AT"  # SIGKILL itself at the end of step N
NAN_TEST_ENV = "MEGATRON_LLAMA_TEST_NAN_STEPS"  # comma-separated steps whose loss becomes NaN
FAIL_RANK_TEST_ENV = "MEGATRON_LLAMA_TEST_FAIL_RANK"  # this rank raises before its first step


def _on_signal(signum, frame) -> None:
    _signal_received["value"] = signum


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RunHooks:
    """What a run other than plain pretraining changes in the loop (`finetune` sets them).

    ``prepare_model(chunks, resuming)`` runs on the bare chunks before the engine wraps them:
    load starting weights, add adapters, freeze parameters (``resuming``: a checkpoint under
    the load directory will be restored over them). ``build_data(cfg, dp_size, dp_rank,
    tokenizer)`` returns the batches (``TrainData``'s interface). ``transformer_overrides``
    go to `to_transformer_config`; ``metadata`` is added to every checkpoint's."""

    title: str = "pretraining"
    validate_at_end: bool = False  # also after the last step (with --eval-interval)
    prepare_model: Optional[Callable] = None
    build_data: Optional[Callable] = None
    transformer_overrides: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


def preflight(cfg: TrainConfig, world_size: int, ranks_here: Optional[int] = None,
              warn: bool = True):
    """Every check a run must pass before any process group, weight or worker exists: the
    recipe's and the engine's rules, the tokenizer against the model, the data, the memory.
    Returns the tokenizer (or None). `training.commands` runs it before spawning local ranks,
    `pretrain` again in every rank (warnings from rank 0 only)."""
    from megatron_llama.training import engines
    from megatron_llama.training.memory import check_memory_fits

    engines.check(cfg, world_size)  # refuse impossible layouts before any work
    tokenizer = _load_tokenizer(cfg)
    if cfg.data_blend is not None:  # a bad --data fails now, before the model is built
        from megatron_llama.data.blend import resolve_data

        resolve_data(cfg.data_blend).check_files()
    if cfg.save_dir:  # another run writing there is refused before any rank starts
        RunLock(cfg.save_dir).check()
    warn = warn and int(os.environ.get("RANK", 0)) == 0
    if warn and cfg.train_steps <= cfg.warmup_steps and cfg.warmup_steps > 0:
        print(f"warning: {cfg.warmup_steps} warmup steps do not fit in {cfg.train_steps} "
              f"training steps; warming up over {cfg.warmup} step(s) and decaying over the "
              f"rest (set --warmup-steps to choose)", file=sys.stderr, flush=True)
    if cfg.wandb_project:
        check_installed("wandb", "--wandb-project")
    if not cfg.skip_memory_check:
        check_memory_fits(cfg, world_size, ranks_here)
    return tokenizer


def pretrain(cfg: TrainConfig, hooks: Optional[RunHooks] = None) -> dict:
    """Run (or resume) pretraining (or, with ``hooks``, another run of the same loop, such as
    fine-tuning); returns a summary (last step, losses, status)."""
    from megatron_llama.parallel import (
        destroy,
        init_distributed,
        initialize,
        launcher_world_size,
    )

    tokenizer = preflight(cfg, launcher_world_size())
    rank, world = init_distributed()
    watchdog = Watchdog(rank, cfg.hang_timeout).start()
    lock = None
    try:
        initialize(cfg.layout, seed=cfg.seed)
        lock = _lock_save_dir(cfg, rank)
        return _train(cfg, tokenizer, rank, world, watchdog, hooks or RunHooks())
    finally:
        watchdog.stop()
        if lock is not None:
            lock.release()
        destroy()  # process groups; torch.distributed stays up for another run


def _lock_save_dir(cfg: TrainConfig, rank: int) -> Optional[RunLock]:
    """Rank 0 takes ``--save``'s one-writer lock for the run; every rank learns the outcome
    (a refusal is the same one line on every rank)."""
    import torch.distributed as dist

    lock, outcome = None, [None, None]
    if rank == 0 and cfg.save_dir:
        lock = RunLock(cfg.save_dir)
        try:
            outcome = [None, lock.acquire()]
        except ConfigError as e:
            outcome = [str(e), None]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        raise ConfigError(outcome[0])
    if outcome[1]:
        print(f"{cfg.save_dir}: {outcome[1]}", file=sys.stderr, flush=True)
    if lock is not None:  # no other run writes here: leftovers of failed saves can go
        removed = remove_failed_saves(cfg.save_dir)
        if removed:
            print(f"{cfg.save_dir}: removed {', '.join(removed)} (saves that did not finish)",
                  file=sys.stderr, flush=True)
    return lock


def _train(cfg: TrainConfig, tokenizer, rank: int, world: int, watchdog: Watchdog,
           hooks: RunHooks) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_llama.data.batches import build_train_data
    from megatron_llama.model.build import build_model
    from megatron_llama.training.engines import create_engine
    from megatron_llama.training.metrics import (
        RunLog,
        flops_per_token,
        memory_gb,
        peak_tflops,
    )

    tconfig = to_transformer_config(cfg.model, cfg.layout, dtype=cfg.dtype, recompute=cfg.recompute,
                                    **hooks.transformer_overrides)
    chunks = build_model(cfg.model, tconfig)
    if hooks.prepare_model is not None:
        with watchdog.long("preparing the model"):
            hooks.prepare_model(chunks, _has_checkpoint(cfg))
    engine = create_engine(cfg, chunks, tconfig)
    state = {"iteration": 0, "consumed_samples": 0, "updates": 0, "skipped": 0,
             "schedule": schedule_of(cfg)}
    if cfg.load_dir:
        with watchdog.long("loading the checkpoint"):
            loaded = engine.load(cfg.load_dir,
                                 expected_model=_checkpoint_metadata(cfg, hooks)["model"])
        if loaded is not None:
            state.update(loaded)
            state["schedule"] = _resumed_schedule(cfg, loaded.get("schedule"), rank)
    dp_size, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    if hooks.build_data is not None:
        data = hooks.build_data(cfg, dp_size, dp_rank, tokenizer)
    else:
        data = build_train_data(cfg, dp_size, dp_rank, cfg.model.vocab_size,
                                tokenizer.eos_id if tokenizer else None)
    log = RunLog(cfg.log_file or (os.path.join(cfg.save_dir, "log.jsonl") if cfg.save_dir else None),
                 active=rank == 0, wandb_project=cfg.wandb_project, wandb_run=cfg.wandb_run,
                 wandb_dir=cfg.save_dir, config=_plain(cfg), start_step=state["iteration"])
    if log.dropped:
        print(f"log: dropped {log.dropped} record(s) past step {state['iteration']} (written "
              "after that checkpoint; those steps run again)", flush=True)
    dist.barrier()  # all ranks measure the CPU peak together, as they will train
    peak, peak_source = peak_tflops(cfg.peak_tflops)
    flops_tok = flops_per_token(cfg.model, cfg.seq_length)
    tokens_per_step = cfg.global_batch * cfg.seq_length
    if rank == 0:
        print(f"{hooks.title} {cfg.model.num_params():,} parameters, "
              f"{cfg.layout.describe(world)}, engine {engine.describe()}, "
              f"{data.num_microbatches} microbatches of "
              f"{cfg.micro_batch} x {cfg.seq_length}, {cfg.dtype}, peak {peak:.3f} TFLOP/s "
              f"({peak_source}); starting at step {state['iteration'] + 1}", flush=True)
    if hasattr(data, "describe"):  # fine-tuning rows: the packing efficiency goes in the log
        log.write({"step": state["iteration"], "packing_efficiency": data.efficiency,
                   "train_rows": len(data.train_rows), "valid_rows": len(data.valid_rows)},
                  echo=f"data: {data.describe()}")
    _signal_received["value"] = 0
    # SIGTERM / SIGUSR1: Slurm's preemption warning; SIGINT: Ctrl-C (forwarded to every rank
    # by `local_ranks.run_cli_ranks`). All three: finish this step, save, exit.
    previous = {s: signal.signal(s, _on_signal)
                for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    losses: dict[int, float] = {}
    save_s = 0.0
    status = "finished"
    kill_after = int(os.environ.get(SIGKILL_TEST_ENV, 0))
    nan_steps = {int(x) for x in os.environ.get(NAN_TEST_ENV, "").split(",") if x.strip()}
    if os.environ.get(FAIL_RANK_TEST_ENV) == str(rank):
        raise RuntimeError(f"fault injection: rank {rank} fails ({FAIL_RANK_TEST_ENV})")
    try:
        while state["iteration"] < cfg.train_steps:
            it = state["iteration"] + 1
            start = time.perf_counter()
            injected_hang(it, rank)
            local = engine.forward_backward(data.train_batches(state["consumed_samples"]),
                                            poison=it in nan_steps)
            loss, stop_signal = _agree(local, _signal_received["value"])
            record = {"step": it}
            if math.isfinite(loss):
                record["grad_norm"] = engine.step(state["updates"] + 1)
                state["updates"] += 1
            else:
                state["skipped"] += 1
                message = f"step {it}: loss is {loss}; "
                if cfg.nan_policy == "stop":
                    raise NonFiniteLoss(message + "stopping (--on-nan stop)")
                engine.skip()
                if rank == 0:
                    print(message + "update skipped (--on-nan skip)", flush=True)
            state["iteration"] = it
            state["consumed_samples"] += cfg.global_batch
            elapsed = time.perf_counter() - start
            if cfg.save_dir:  # an asynchronous save of an earlier step may be complete
                engine.finish_saves(blocking=False)
                save_s += time.perf_counter() - start - elapsed
            losses[it] = loss
            tok_s_gpu = tokens_per_step / elapsed / world
            tflops = tok_s_gpu * flops_tok / 1e12
            # time the loop waited on checkpoints since the last record (saves, commits)
            record["save_s"], save_s = save_s, 0.0
            record.update(loss=loss, lr=engine.lr, skipped=state["skipped"],
                          consumed_samples=state["consumed_samples"], step_time=elapsed,
                          tokens_per_s_per_gpu=tok_s_gpu, tflops_per_gpu=tflops,
                          mfu=tflops / peak if peak else None, memory_gb=memory_gb())
            if it % cfg.log_interval == 0 or it == cfg.train_steps:
                log.write(record, echo=_format(record))
            watchdog.beat(it, elapsed)
            if cfg.eval_interval and (it % cfg.eval_interval == 0 or (
                    hooks.validate_at_end and it == cfg.train_steps)):
                with watchdog.long(f"validation after step {it}"):
                    _evaluate(engine, data, cfg, log, it)
            exiting = bool(cfg.exit_after_steps) and it >= cfg.exit_after_steps
            must_save = ((cfg.save_interval and it % cfg.save_interval == 0) or stop_signal
                         or exiting)
            if cfg.save_dir and (must_save or it == cfg.train_steps):
                with watchdog.long(f"saving the checkpoint of step {it}"):
                    saving = time.perf_counter()
                    engine.save(cfg.save_dir, it, state, _checkpoint_metadata(cfg, hooks))
                    if stop_signal or exiting or it == cfg.train_steps:
                        engine.finish_saves(blocking=True)  # complete before we stop
                    save_s += time.perf_counter() - saving
            if kill_after and it >= kill_after:  # after this step's log and save, if any
                _crash()
            if stop_signal:
                status = f"stopped by a signal after step {it}"
                if rank == 0:
                    saved = (f"checkpoint saved in {cfg.save_dir} (the same command resumes)"
                             if cfg.save_dir else "nothing saved (no --save)")
                    print(f"{status}; {saved}", flush=True)
                break
            if exiting:
                status = f"exit after {it} steps"
                break
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.close()
    return {"status": status, "iteration": state["iteration"], "losses": losses,
            "interrupted": _signal_received["value"] == signal.SIGINT,
            "skipped": state["skipped"]}


def _resumed_schedule(cfg: TrainConfig, saved: Optional[dict], rank: int) -> dict:
    """The schedule a resumed run follows: the checkpoint's (the engines keep it), unless
    ``--override-schedule`` re-plans it from this run's flags; either way said once."""
    current = schedule_of(cfg)
    if saved is None or dict(saved) == current:
        return current
    changes = ", ".join(f"{k.replace('_', ' ')} {saved[k]} -> {current[k]}"
                        for k in SCHEDULE_FIELDS if saved.get(k) != current[k])
    if rank == 0:
        if cfg.override_schedule:
            print(f"re-planning the lr schedule from this run's flags ({changes}): "
                  f"{describe_schedule(current)}", file=sys.stderr, flush=True)
        else:
            print(f"warning: this run's schedule differs from the checkpoint's ({changes}); "
                  f"continuing the checkpoint's: {describe_schedule(saved)} "
                  "(--override-schedule re-plans it)", file=sys.stderr, flush=True)
    return current if cfg.override_schedule else dict(saved)


def _crash() -> None:
    """Fault injection: die as a crashed node does, helper processes (checkpoint writers,
    DeepSpeed's) included, so none outlives the test as an orphan."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def _agree(local_losses: list, signum: int) -> tuple[float, bool]:
    """Global mean loss (from the last pipeline stage) and whether any rank got a signal.

    One all-reduce of [sum of stage losses, number of last-stage ranks, signal flag]. With
    per-token losses (each microbatch reports [token loss sum, token count]) the first two
    are the sums of those: the mean over every trained token of the global batch.
    """
    import torch.distributed as dist

    total = torch.zeros(3, dtype=torch.float64)
    if local_losses:
        stacked = torch.stack(local_losses).double()
        if stacked.dim() == 2:  # [microbatch, (sum, count)]
            total[0], total[1] = stacked[:, 0].sum(), stacked[:, 1].sum()
        else:
            total[0] = stacked.mean()
            total[1] = 1.0
    total[2] = 1.0 if signum else 0.0
    dist.all_reduce(total)
    loss = (total[0] / total[1]).item() if total[1] > 0 else float("nan")
    return loss, bool(total[2] > 0)


def _evaluate(engine, data, cfg: TrainConfig, log, step: int) -> None:
    batches = data.valid_batches(cfg.eval_iters)
    if not batches:
        return
    loss, _ = _agree(engine.evaluate(batches), 0)
    log.write({"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))},
              echo=f"step {step:>6} | validation loss {loss:.4f} | perplexity {math.exp(min(loss, 50)):.2f}")


def _format(r: dict) -> str:
    mfu = f" | MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
    gn = f" | grad norm {r['grad_norm']:.3f}" if r.get("grad_norm") is not None else ""
    return (f"step {r['step']:>6} | loss {r['loss']:.4f} | lr {r['lr']:.3e}{gn} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU | {r['tflops_per_gpu']:.3f} TFLOP/s/GPU"
            f"{mfu} | {r['step_time'] * 1e3:.0f} ms | mem {r['memory_gb']:.2f} GB"
            + (f" | skipped {r['skipped']}" if r["skipped"] else ""))


def _load_tokenizer(cfg: TrainConfig):
    if not cfg.tokenizer:
        return None
    from megatron_llama.data.tokenizer import Tokenizer

    tok = Tokenizer(cfg.tokenizer)
    if tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"{cfg.tokenizer}: tokenizer has {tok.vocab_size} pieces but the model "
                          f"vocab_size is {cfg.model.vocab_size} (pass --vocab-size)")
    return tok


def _checkpoint_metadata(cfg: TrainConfig, hooks: Optional[RunHooks] = None) -> dict:
    """What a reader of the checkpoint (resume, conversion) needs besides the tensors."""
    meta = {"model": cfg.model.to_params_json(meta_style=False),
            "layout": {"tp": cfg.layout.tp, "pp": cfg.layout.pp, "vp": cfg.layout.vp},
            "sequence_parallel": cfg.layout.sp, "dtype": cfg.dtype,
            "tokenizer": os.path.abspath(cfg.tokenizer) if cfg.tokenizer else None}
    meta.update(hooks.metadata if hooks else {})
    return meta


def _has_checkpoint(cfg: TrainConfig) -> bool:
    """Whether the load directory holds a checkpoint this run will resume from."""
    from megatron_llama.checkpoint_files import deepspeed_latest_tag, latest_iteration

    if not cfg.load_dir or not os.path.isdir(cfg.load_dir):
        return False
    return (latest_iteration(cfg.load_dir) is not None
            or deepspeed_latest_tag(cfg.load_dir) is not None)


def _plain(cfg: TrainConfig) -> dict:
    out = asdict(cfg)
    out["layout"] = asdict(cfg.layout)
    return out

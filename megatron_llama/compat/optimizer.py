"""Exact resume for megatron-core 0.16.1's DistributedOptimizer on the torch AdamW fallback.

Without TE/apex the DistributedOptimizer wraps torch AdamW, which keeps a per-parameter
``state[p]["step"]`` tensor; megatron-core saves the step once (in the param groups) and
restores it badly: a never-stepped optimizer cannot build its loading state dict
(AssertionError), the fully_reshardable loader raises KeyError 'step', the dp_reshardable
loader overwrites the loaded step with the pre-load one (and fails at fp32 with autograd
on), and every parameter ends up sharing one step tensor. `install` (class-level, run by
`compat.install`) and `fix_distributed_optimizer` (per optimizer) fix that.

Two CPU speed-ups of the same optimizer, bitwise neutral, also live here (`adapt_optimizer`
applies all three to a freshly built optimizer): `use_fused_cpu_adamw` and
`skip_fp32_self_copies`.
"""
from __future__ import annotations

import functools

import torch

_PATCHED = "_megatron_llama_step_fix"


def _distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizer instances inside ``optimizer`` (plain or ChainedOptimizer)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in parts if isinstance(o, DistributedOptimizer)]


def _init_adam_state(dist_opt) -> None:
    """Create torch Adam/AdamW state now, exactly as its first step() would (zero moments,
    one 0-d float32 CPU ``step`` per parameter), so a never-stepped optimizer can be saved
    or loaded into. Training is bitwise unchanged: step() finds the state it would make."""
    inner = dist_opt.optimizer
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return  # TE/apex FusedAdam, CPU offload or no params: no per-parameter step
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad", False):
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)


def _unshare_steps(dist_opt) -> None:
    """Give every parameter its own ``step`` tensor (load_state_dict hands out one shared)."""
    if dist_opt.optimizer is None:
        return
    for state in dist_opt.optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].detach().clone()


def install() -> None:
    """Wrap two DistributedOptimizer methods, once per process (originals: ``__wrapped__``)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as DO

    if getattr(DO, _PATCHED, False):
        return
    set_states, load_state_dict = DO._set_main_param_and_optimizer_states, DO.load_state_dict

    @functools.wraps(set_states)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        # The step that load_state_dict restored from the checkpoint's param groups is the
        # authority; the param-state loaders omit it (fully_reshardable, fs_model_space:
        # KeyError) or pass this rank's pre-load step (dp_reshardable). Copying the live
        # step onto itself keeps the restored value.
        if not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            own_step = self.optimizer.state[main_param].get("step")
            if own_step is not None:
                tensors = {**tensors, "step": own_step}
        with torch.no_grad():  # fp32 main params are views of leaf parameters
            return set_states(self, model_param, tensors)

    @functools.wraps(load_state_dict)
    def _load_state_dict(self, state_dict):
        result = load_state_dict(self, state_dict)
        _unshare_steps(self)
        return result

    DO._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    DO.load_state_dict = _load_state_dict
    setattr(DO, _PATCHED, True)


def fix_distributed_optimizer(optimizer) -> None:
    """Make an optimizer from ``get_megatron_optimizer`` save/resume exactly.

    Call once right after constructing it (before any save or load), after `install` (the
    two method patches, process-wide): creates the AdamW state eagerly. Works for
    the fully_reshardable and dp_reshardable sharding types; a no-op in effect with TE/apex
    FusedAdam (no per-parameter step there) and for non-distributed optimizers.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not getattr(DistributedOptimizer, _PATCHED, False):
        raise RuntimeError("megatron_llama.compat.install() has not run in this process "
                           "(megatron_llama.parallel.initialize runs it)")
    for dist_opt in _distributed_optimizers(optimizer):
        _init_adam_state(dist_opt)


def skip_fp32_self_copies(optimizer) -> int:
    """Drop the distributed optimizer's copy of fp32 main shards onto themselves.

    With fp32 model weights megatron-core's main "copies" are views of the weights, yet after
    every step ``_copy_main_params_to_model_params`` copies each shard onto the very same
    memory: one pointless pass over all weights per step (fp32 is the CPU default). When
    every fp32 pair shares memory and there are no 16-bit groups, the copy is skipped for
    that optimizer; anything else keeps megatron-core's method. Returns how many were changed.
    """
    changed = 0
    for dist_opt in _distributed_optimizers(optimizer):
        if any(g for g in getattr(dist_opt, "model_float16_groups", [[]]) if g):
            continue
        pairs = []
        for shard_group, model_group in zip(dist_opt.shard_fp32_groups, dist_opt.model_fp32_groups):
            for shard_main, model_param in zip(shard_group, model_group):
                gbuf, _, bucket = dist_opt.model_param_gbuf_map[model_param]
                world = dist_opt._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                target = dist_opt.buffers[gbuf].buckets[bucket].param_data.view(-1)[
                    world.start:world.end]
                pairs.append(target.data_ptr() == shard_main.data_ptr())
        if pairs and all(pairs):
            dist_opt._copy_main_params_to_model_params = lambda: None
            changed += 1
    return changed


def use_fused_cpu_adamw(optimizer) -> int:
    """Switch torch AdamW inside megatron-core's optimizer to torch's fused CPU kernel.

    megatron-core builds ``torch.optim.AdamW`` without ``fused`` when TE/apex are absent, so
    on CPU every parameter shard takes the per-tensor Python loop (~10 elementwise passes
    over the fp32 states: ~9 % of a step at 60M parameters). The fused kernel does the same
    update in one pass per tensor. The flag is read at every ``step()``; the eagerly created
    state (0-d float32 ``step`` on the CPU) is what the fused path expects. Returns the
    number of torch optimizers switched.
    """
    switched = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(inner, torch.optim.AdamW) or inner.defaults.get("differentiable"):
            continue
        if any(p.is_cuda for g in inner.param_groups for p in g["params"]):
            continue
        inner.defaults.update(fused=True, foreach=None)
        for group in inner.param_groups:
            group.update(fused=True, foreach=None)
        switched += 1
    return switched


def adapt_optimizer(optimizer) -> None:
    """Everything this module does, for an optimizer fresh from ``get_megatron_optimizer``:
    exact resume (`fix_distributed_optimizer`), and on CPU the fused AdamW kernel and no
    fp32 self-copies. Numerics are bitwise those of megatron-core's own step."""
    fix_distributed_optimizer(optimizer)  # megatron-core 0.16.1 resume bugs without TE/apex
    if not torch.cuda.is_available():
        use_fused_cpu_adamw(optimizer)
    skip_fp32_self_copies(optimizer)

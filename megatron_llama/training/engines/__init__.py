"""Training engines behind one interface (`base.Engine`), chosen by ``TrainConfig.engine``.

- ``megatron`` (`megatron_core.MegatronEngine`): megatron-core DDP + distributed optimizer +
  the layout's pipeline schedule; every layout (TP, SP, PP, VP, DP).
- ``deepspeed`` (`deepspeed_zero.DeepSpeedEngine`): DeepSpeed ZeRO-1/2/3 around the same
  megatron-core model; TP without SP, no PP.

Engines are imported only when chosen (DeepSpeed is heavy to import).
"""

from __future__ import annotations

from megatron_llama.training.engines.base import Engine
from megatron_llama.training.recipe import ENGINES, TrainConfig


def engine_class(name: str) -> type[Engine]:
    """The `Engine` implementation called ``name`` (one of `recipe.ENGINES`)."""
    if name == "megatron":
        from megatron_llama.training.engines.megatron_core import MegatronEngine

        return MegatronEngine
    if name == "deepspeed":
        from megatron_llama.training.engines.deepspeed_zero import DeepSpeedEngine

        return DeepSpeedEngine
    raise ValueError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")


def check(cfg: TrainConfig, world_size: int) -> None:
    """Every rule a run must pass before any work: the recipe's, then its engine's."""
    cfg.check(world_size)
    engine_class(cfg.engine).check(cfg)


def create_engine(cfg: TrainConfig, chunks: list, tconfig) -> Engine:
    """The engine of ``cfg`` around this rank's model ``chunks`` (from `model.build`)."""
    return engine_class(cfg.engine)(cfg, chunks, tconfig)

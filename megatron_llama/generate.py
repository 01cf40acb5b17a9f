"""`megatron-llama generate`: sample text from a Meta directory or a Megatron checkpoint.

The model is megatron-core's GPTModel in the current layout (TP=1, or TP=2 under torchrun /
``--nproc-per-node 2``), with megatron-core's static KV cache: the prompt is run once
(prefill), then each new token costs one single-position forward over the cached keys and
values. Greedy (``temperature 0``) or temperature + top-p (nucleus) sampling; every rank
draws from the same seeded generator over the same gathered logits, so all ranks agree.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from megatron_llama.errors import ConfigError
from megatron_llama.model.config import LlamaConfig

if TYPE_CHECKING:  # annotations only: torch is imported where it is used
    import torch


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.9
    seed: int = 0


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """Next token id from last-position logits [V]: greedy, or top-p over softmax(l / T)."""
    import torch

    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / sampling.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p  # always keeps top-1
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice])


def generate_ids(model, cfg: LlamaConfig, prompt_ids: list[int], sampling: Sampling,
                 stop_ids: Sequence[int] = ()) -> list[int]:
    """New token ids after ``prompt_ids``, with a KV cache; stops after the first id in
    ``stop_ids`` (EOS; Llama 3 also ``<|eot_id|>`` and ``<|eom_id|>``), which is included."""
    import torch
    from megatron.core.inference.contexts import StaticInferenceContext

    total = min(cfg.max_seq_len, len(prompt_ids) + sampling.max_new_tokens)
    if len(prompt_ids) >= total:
        raise ConfigError(f"prompt of {len(prompt_ids)} tokens leaves no room within "
                          f"max_seq_len {cfg.max_seq_len}")
    context = StaticInferenceContext(1, total)
    generator = torch.Generator().manual_seed(sampling.seed)
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt_ids], device=device)
    positions = torch.arange(len(prompt_ids), device=device)[None]
    out: list[int] = []
    model.eval()
    with torch.no_grad():
        while len(prompt_ids) + len(out) < total:
            logits = model(tokens, positions, None, inference_context=context,
                           runtime_gather_output=True)
            context.sequence_len_offset += tokens.shape[1]
            next_id = sample_next(logits[0, -1, : cfg.vocab_size].float(), sampling, generator)
            out.append(next_id)
            if next_id in stop_ids:
                break
            position = len(prompt_ids) + len(out) - 1
            tokens = torch.tensor([[next_id]], device=device)
            positions = torch.tensor([[position]], device=device)
    return out


def load_model(checkpoint: str, tp: int = 1):
    """(model, config, tokenizer path or None) for a Meta or Hugging Face directory or a
    Megatron checkpoint root.

    Runs in the current process group: world size must equal ``tp``.
    """
    import torch
    import torch.distributed as dist

    from megatron_llama.convert.load import checkpoint_config, load_into
    from megatron_llama.model.build import build_model
    from megatron_llama.model.config import to_transformer_config
    from megatron_llama.parallel import ParallelLayout, init_distributed, initialize

    cfg, tokenizer, source = checkpoint_config(checkpoint)
    _, world = init_distributed()
    layout = ParallelLayout(tp=tp)
    if world != tp:
        raise ConfigError(f"generate runs with TP = world size; got TP={tp}, world {world}")
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    layout.check(cfg, world)
    initialize(layout)
    model = build_model(cfg, to_transformer_config(cfg, layout, dtype=dtype))[0]
    load_into([model], cfg, checkpoint, source)
    dist.barrier()
    return model, cfg, tokenizer


def generate_text(checkpoint: str, prompt: str, sampling: Sampling, tp: int = 1,
                  tokenizer_path: Optional[str] = None, chat: bool = False,
                  system: Optional[str] = None) -> str:
    """The prompt's continuation as text (BOS prepended, stops at the tokenizer's stop ids).

    ``chat``: ``prompt`` is a user message (after ``system`` if given) in the chat format of
    the tokenizer's generation (Llama 2 ``[INST]``, Llama 3 headers); returns the answer.
    """
    from megatron_llama.data.chat import encode_chat
    from megatron_llama.data.tokenizer import Tokenizer
    from megatron_llama.parallel import destroy

    given = Tokenizer(tokenizer_path) if tokenizer_path else None  # a bad path fails first
    model, cfg, found = load_model(checkpoint, tp)
    try:
        path = tokenizer_path or found
        if path is None:
            raise ConfigError(f"{checkpoint}: no tokenizer.model found; pass --tokenizer")
        tok = given or Tokenizer(path)
        if tok.vocab_size != cfg.vocab_size:
            raise ConfigError(f"{path}: {tok.vocab_size} pieces, model vocab {cfg.vocab_size}")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else [])
            prompt_ids = encode_chat(tok, messages + [{"role": "user", "content": prompt}])
        else:
            prompt_ids = tok.encode(prompt, bos=True)
        stops = tok.stop_ids
        ids = generate_ids(model, cfg, prompt_ids, sampling, stops)
        return tok.decode([i for i in ids if i not in stops])
    finally:
        destroy()


def _check_tp(tp: int) -> None:
    """One process per GPU, or per CPU core on a CPU host: refuse more (before spawning)."""
    import torch

    if tp < 1:
        raise ConfigError(f"--tp must be at least 1, got {tp}")
    if torch.cuda.is_available():
        if tp > torch.cuda.device_count():
            raise ConfigError(f"--tp {tp}: this host has {torch.cuda.device_count()} GPU(s)")
    elif tp > (os.cpu_count() or 1):
        raise ConfigError(f"--tp {tp}: this CPU host has {os.cpu_count()} core(s); at most "
                          f"--tp {os.cpu_count()} (one process per core)")


def cmd_generate(args) -> int:
    from megatron_llama.local_ranks import run_cli_ranks, under_launcher

    _check_tp(args.tp)
    if args.tp > 1 and not under_launcher():
        return run_cli_ranks(args.tp, sys.argv[1:], drop_flag=None)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, seed=args.seed)
    if args.system and not args.chat:
        raise ConfigError("--system is part of a chat prompt: give --chat too")
    text = generate_text(args.checkpoint, args.prompt, sampling, tp=args.tp,
                         tokenizer_path=args.tokenizer, chat=args.chat, system=args.system)
    if int(os.environ.get("RANK", 0)) == 0:
        print(text if args.chat else args.prompt + text)
    return 0


def add_command(subparsers) -> None:
    """Register `generate`."""
    gen = subparsers.add_parser(
        "generate", help="sample text from a Meta, Hugging Face or Megatron checkpoint",
        description="Continue --prompt with a KV-cached megatron-core model loaded from a Meta "
        "or Hugging Face directory or a `pretrain` checkpoint: greedy (--temperature 0, default) or "
        "temperature + top-p sampling. Stops at the tokenizer's end tokens (EOS; Llama 3 also "
        "<|eot_id|>). --chat sends --prompt as a user message in the chat format of the "
        "checkpoint's generation. --tp 2 runs on 2 local processes.")
    gen.add_argument("--checkpoint", required=True,
                     help="Meta or Hugging Face directory, or a checkpoint root")
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel size: local processes, one per GPU (CPU: per core)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to add (64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus mass when sampling (0.9)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    gen.add_argument("--tokenizer", default=None,
                     help="tokenizer.model, SentencePiece or tiktoken (default: the "
                          "checkpoint's own)")
    gen.add_argument("--chat", action="store_true",
                     help="--prompt is a user turn in the generation's chat format (Llama 2 "
                          "[INST] ... [/INST], Llama 3 header/eot tokens); prints the answer")
    gen.add_argument("--system", default=None,
                     help="with --chat: a system message before the user's")
    gen.set_defaults(func=cmd_generate)

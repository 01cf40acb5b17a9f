"""Instruction records (Alpaca, chat) as token ids with a loss mask: what fine-tuning learns.

Two record formats, each one JSON object:

- Alpaca (Taori et al. 2023): ``instruction``, optional ``input``, ``output``. The prompt is
  Alpaca's own, in its with-input and without-input variants; the response is ``output``
  followed by EOS.
- chat: ``messages``, a list of ``{role, content}`` (system, user, assistant; several turns),
  rendered in the chat format of the tokenizer's generation or a Jinja template given by the
  user (`data.chat`). Every assistant turn is a response.

`tokenize_record` returns ``(ids, mask)``: ``mask[t]`` is 1 where token ``t`` is part of a
response, i.e. where predicting it from the tokens before is trained; prompt, system and user
tokens are 0. The boundary is found on the token ids themselves (the longest common prefix of
the prompt's ids and the ids with the response), so a tokenizer that merges across the
boundary moves it by a token rather than misaligning the labels.
"""

from __future__ import annotations

from typing import Any, Optional

from megatron_llama.data.chat import check_messages, encode_chat

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
FORMATS = ("auto", "alpaca", "chat")


class BadExample(ValueError):
    """A record that cannot be trained on; the message is the reason (one line)."""


def record_format(record: Any, wanted: str = "auto") -> str:
    """``alpaca`` or ``chat`` for a record (``auto``: by its fields), or `BadExample`."""
    if not isinstance(record, dict):
        raise BadExample("not a JSON object")
    if wanted == "auto":
        if "messages" in record:
            return "chat"
        if "instruction" in record:
            return "alpaca"
        raise BadExample("neither 'instruction' (Alpaca) nor 'messages' (chat)")
    return wanted


def alpaca_prompt(record: dict) -> tuple[str, str]:
    """(prompt, response) of an Alpaca record, or `BadExample`."""
    instruction, extra, output = (record.get(k) for k in ("instruction", "input", "output"))
    if not isinstance(instruction, str) or not instruction.strip():
        raise BadExample("missing or empty 'instruction'")
    if not isinstance(output, str) or not output.strip():
        raise BadExample("no response ('output' missing or empty)")
    if extra is not None and not isinstance(extra, str):
        raise BadExample("'input' is not a string")
    if extra and extra.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra), output
    return ALPACA_PROMPT.format(instruction=instruction), output


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_alpaca(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """BOS + prompt + response + EOS, the response and EOS in the loss."""
    prompt, response = alpaca_prompt(record)
    prompt_ids = tokenizer.encode(prompt, bos=True)
    ids = tokenizer.encode(prompt + response, bos=True, eos=True)
    start = _common_prefix(prompt_ids, ids)
    return ids, [0] * start + [1] * (len(ids) - start)


def tokenize_chat(tokenizer, record: dict, template: Optional[str] = None
                  ) -> tuple[list[int], list[int]]:
    """The conversation in its chat format; every assistant turn (and the end-of-turn token
    that closes it) in the loss, everything else out of it."""
    from megatron_llama.errors import ConfigError

    messages = record.get("messages")
    try:
        messages = check_messages(messages)
    except ConfigError as e:
        raise BadExample(str(e)) from None
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadExample("no response (no assistant message)")
    if messages[-1]["role"] != "assistant":
        messages = messages[:-1] if messages[-1]["role"] == "user" else messages
    try:
        ids = encode_chat(tokenizer, messages, template, add_generation_prompt=False)
        mask = [0] * len(ids)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = encode_chat(tokenizer, messages[:i], template, add_generation_prompt=True)
            through = encode_chat(tokenizer, messages[:i + 1], template,
                                  add_generation_prompt=False)
            start = _common_prefix(before, through)
            end = _common_prefix(through, ids)
            for t in range(start, end):
                mask[t] = 1
    except ConfigError as e:  # e.g. the template's raise_exception: roles out of order
        raise BadExample(str(e)) from None
    if not any(mask):
        raise BadExample("no response tokens after rendering")
    return ids, mask


def tokenize_record(tokenizer, record: Any, fmt: str = "auto",
                    template: Optional[str] = None) -> tuple[list[int], list[int]]:
    """(ids, loss mask) of one record; `BadExample` with the reason if it is unusable."""
    kind = record_format(record, fmt)
    if kind == "alpaca":
        return tokenize_alpaca(tokenizer, record)
    return tokenize_chat(tokenizer, record, template)


def fit_length(ids: list[int], mask: list[int], max_tokens: int, overlong: str
               ) -> Optional[tuple[list[int], list[int]]]:
    """An example cut to ``max_tokens`` (``truncate``: keep the start; ``drop``: None), or
    unchanged; a truncated example that keeps no response token is dropped too."""
    if len(ids) <= max_tokens:
        return ids, mask
    if overlong == "drop":
        return None
    ids, mask = ids[:max_tokens], mask[:max_tokens]
    return (ids, mask) if any(mask) else None

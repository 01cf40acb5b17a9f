"""Chat formats of the LLaMA generations, as Jinja templates, and their tokenization.

One template per format is the single source of truth: `encode_chat` renders it and turns
the special-token text it contains into ids, and the Hugging Face export writes the same
template into ``tokenizer_config.json`` (``chat_template``).

- ``llama2`` (Llama 2 chat, Code Llama instruct): ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n
  {user} [/INST] {answer} </s>``, each later turn ``<s>[INST] {user} [/INST] {answer} </s>``.
  The text between ``<s>`` and ``</s>`` is encoded as one piece, as Meta's code does.
- ``llama3`` (Llama 3.x instruct): ``<|begin_of_text|>``, then per message
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``; a generation is
  prompted with the assistant header.
Contents are stripped of surrounding whitespace, as in Meta's reference code.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Sequence

from megatron_llama.errors import ConfigError

# Newlines are written as {{ '\n' }} expressions: a literal newline next to a {%- -%} tag
# would be eaten by Jinja's whitespace control.
TEMPLATES = {
    "llama2": (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] | trim -%}"
        "{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        "{%- for m in turns -%}"
        "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
        "{{ raise_exception('llama2 chat: roles must alternate user, assistant, user, ...') }}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}"
        "{%- if loop.first and system -%}"
        "{{ bos_token }}[INST] <<SYS>>{{ '\\n' }}{{ system }}{{ '\\n' }}<</SYS>>{{ '\\n\\n' }}"
        "{{ m['content'] | trim }} [/INST]"
        "{%- else -%}{{ bos_token }}[INST] {{ m['content'] | trim }} [/INST]{%- endif -%}"
        "{%- else -%}{{ ' ' }}{{ m['content'] | trim }} {{ eos_token }}{%- endif -%}"
        "{%- endfor -%}"
    ),
    "llama3": (
        "{{- bos_token -}}"
        "{%- for m in messages -%}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>{{ '\\n\\n' }}"
        "{{- m['content'] | trim -}}<|eot_id|>"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}"
        "<|start_header_id|>assistant<|end_header_id|>{{ '\\n\\n' }}"
        "{%- endif -%}"
    ),
}
SPECIALS = {"llama2": {"bos_token": "<s>", "eos_token": "</s>"},
            "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}}


def chat_template(name: str) -> str:
    """The Jinja template of chat format ``name`` (``llama2`` or ``llama3``)."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown chat format {name!r}; choose from {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def chat_format_for(tokenizer) -> str:
    """The chat format of a tokenizer's generation: tiktoken -> llama3, else llama2."""
    return "llama3" if tokenizer.kind == "tiktoken" else "llama2"


def _raise(message: str):
    raise ConfigError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise ConfigError(f"chat template does not parse: {e.message} (line {e.lineno})") from None


def compile_template(text: str):
    """A user's Jinja chat template, parsed (one line naming the error if it cannot be)."""
    return _compile(text)


def check_messages(messages: Any) -> list[dict]:
    """``messages`` as a list of {role, content} with known roles, or one line saying why."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise ConfigError(f"message {i}: needs a string 'content'")
        if m.get("role") not in ("system", "user", "assistant", "ipython", "tool"):
            raise ConfigError(f"message {i}: unknown role {m.get('role')!r}")
    return messages


def render_chat(messages: Sequence[dict], template: str, *, add_generation_prompt: bool = True,
                bos_token: str = "<s>", eos_token: str = "</s>") -> str:
    """The text of a conversation in a chat template (Jinja, Hugging Face's variables)."""
    from jinja2 import TemplateError

    check_messages(list(messages))
    try:
        return _compile(template).render(messages=list(messages), bos_token=bos_token,
                                         eos_token=eos_token,
                                         add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise ConfigError(f"chat template does not render: {e}") from None


def encode_with_specials(tokenizer, text: str, restore: dict[str, str] | None = None) -> list[int]:
    """Ids of ``text`` where the tokenizer's special-token strings become their ids and the
    text between them is encoded on its own (no BOS added). ``restore`` maps placeholders
    back to the text they hid from the split (see `encode_chat`)."""
    specials = tokenizer.special_tokens
    if not specials:
        return tokenizer.encode(_restore(text, restore))
    pattern = re.compile("(" + "|".join(re.escape(s) for s in
                                        sorted(specials, key=len, reverse=True)) + ")")
    ids: list[int] = []
    for i, piece in enumerate(pattern.split(text)):
        if i % 2:
            ids.append(specials[piece])
        elif piece:
            ids.extend(tokenizer.encode(_restore(piece, restore)))
    return ids


def _restore(text: str, restore: dict[str, str] | None) -> str:
    for placeholder, original in (restore or {}).items():
        text = text.replace(placeholder, original)
    return text


def encode_chat(tokenizer, messages: Sequence[dict], template: str | None = None, *,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the tokenizer's generation's format (or ``template``).

    Special-token text inside a message (``<|eot_id|>`` typed by a user) stays text, as
    Meta's chat code encodes message contents: it is replaced by private-use placeholders
    before rendering and put back inside the text piece it belongs to.
    """
    name = chat_format_for(tokenizer)
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    hide = {s: f"\ue000{i}\ue001" for i, s in enumerate(specials)}
    pattern = re.compile("|".join(re.escape(s) for s in specials)) if specials else None

    def hidden(content: str) -> str:
        return pattern.sub(lambda m: hide[m.group(0)], content) if pattern else content

    safe = [dict(m, content=hidden(m["content"])) for m in check_messages(list(messages))]
    text = render_chat(safe, template or chat_template(name),
                       add_generation_prompt=add_generation_prompt, **SPECIALS[name])
    return encode_with_specials(tokenizer, text, {v: k for k, v in hide.items()})

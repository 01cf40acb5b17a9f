"""A small instruction set the project writes itself, so fine-tuning runs with no download.

Records are generated deterministically (a fixed seed) from two sources that need nothing
but Python: tasks whose answers the generator computes (arithmetic, sorting, reversing,
counting, case changes, Python expressions), and questions about the standard library whose
answers are the first sentence of the function's own docstring. About 320 Alpaca records
(with and without ``input``) and 80 multi-turn chat records (``messages``).
"""

from __future__ import annotations

import importlib
import inspect
import random
from typing import Iterator

# standard-library callables asked about ("What does `math.gcd` do?")
_DOCUMENTED = {
    "math": ["gcd", "sqrt", "floor", "ceil", "factorial", "isclose", "hypot", "log2", "comb",
             "perm", "prod", "fsum"],
    "os.path": ["join", "basename", "dirname", "splitext", "exists", "isabs", "normpath"],
    "json": ["dumps", "loads"],
    "itertools": ["chain", "groupby", "accumulate", "permutations", "product", "islice"],
    "functools": ["reduce", "partial", "lru_cache", "wraps"],
    "statistics": ["mean", "median", "stdev", "mode"],
    "textwrap": ["wrap", "dedent", "indent", "shorten"],
    "shutil": ["copyfile", "rmtree", "which", "move"],
    "random": ["choice", "shuffle", "sample"],
    "string": ["capwords"],
}
_WORDS = ("llama alpaca vicuna camel guanaco pipeline tensor gradient token shard layer "
          "optimizer rotary norm batch kernel cluster node checkpoint dataset").split()


def _first_sentence(doc: str) -> str:
    text = " ".join(doc.strip().split("\n\n")[0].split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def documented_answers() -> list[tuple[str, str]]:
    """(qualified name, first sentence of its docstring) for the listed callables."""
    out = []
    for module_name, names in _DOCUMENTED.items():
        module = importlib.import_module(module_name)
        for name in names:
            doc = inspect.getdoc(getattr(module, name, None))
            if doc:
                out.append((f"{module_name}.{name}", _first_sentence(doc)))
    return out


def _computed(rng: random.Random) -> tuple[str, str, str]:
    """(instruction, input, output) of one task whose answer is computed here."""
    kind = rng.randrange(7)
    if kind == 0:
        a, b = rng.randrange(10, 999), rng.randrange(10, 999)
        return "Add the two numbers.", f"{a} and {b}", str(a + b)
    if kind == 1:
        xs = rng.sample(range(1, 100), rng.randrange(3, 8))
        return ("Sort these numbers in ascending order.", ", ".join(map(str, xs)),
                ", ".join(map(str, sorted(xs))))
    if kind == 2:
        word = rng.choice(_WORDS)
        return "Reverse the letters of the word.", word, word[::-1]
    if kind == 3:
        words = rng.sample(_WORDS, rng.randrange(3, 9))
        return "How many words are in this sentence?", " ".join(words), str(len(words))
    if kind == 4:
        words = " ".join(rng.sample(_WORDS, 4))
        return "Convert the text to upper case.", words, words.upper()
    if kind == 5:
        a, b = rng.randrange(2, 30), rng.randrange(2, 30)
        return "What is the value of this Python expression?", f"{a} * {b} - {a}", str(a * b - a)
    word = rng.choice(_WORDS)
    letter = rng.choice(sorted(set(word)))
    return (f"How many times does the letter '{letter}' appear in the word?", word,
            str(word.count(letter)))


def alpaca_records(n: int = 320, seed: int = 0) -> list[dict]:
    """``n`` Alpaca records: every documented callable once (no ``input``), then computed
    tasks (with ``input``)."""
    rng = random.Random(seed)
    out = [{"instruction": f"What does `{name}` do in Python?", "input": "", "output": answer}
           for name, answer in documented_answers()]
    while len(out) < n:
        instruction, extra, output = _computed(rng)
        out.append({"instruction": instruction, "input": extra, "output": output})
    return out[:n]


def chat_records(n: int = 80, seed: int = 1) -> list[dict]:
    """``n`` conversations of 1-3 user/assistant turns, some with a system message."""
    rng = random.Random(seed)
    documented = documented_answers()
    out = []
    for i in range(n):
        messages = []
        if i % 2 == 0:
            messages.append({"role": "system", "content": "You are a concise assistant."})
        for _ in range(rng.randrange(1, 4)):
            if rng.random() < 0.4:
                name, answer = rng.choice(documented)
                messages += [{"role": "user", "content": f"What does {name} do?"},
                             {"role": "assistant", "content": answer}]
            else:
                instruction, extra, output = _computed(rng)
                messages += [{"role": "user", "content": f"{instruction} {extra}"},
                             {"role": "assistant", "content": output}]
        out.append({"messages": messages})
    return out


def iter_records() -> Iterator[dict]:
    """The whole set: Alpaca records, then chat records."""
    yield from alpaca_records()
    yield from chat_records()

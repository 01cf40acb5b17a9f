"""How the LLaMA paper scores multiple choice, and its numbers to print beside ours.

Paper, section 3 (docs/evaluation.md): the chosen completion is the one with the highest
likelihood given the context, normalised by the number of characters in the completion
(lm-eval's ``acc_norm``), except for OpenBookQA and BoolQ, where it is normalised by the
likelihood of the completion given "Answer:" as the context:
``log P(completion | context) - log P(completion | "Answer:")``. lm-eval's own
``acc_mutual_info`` conditions on an empty context instead, so the second form needs
requests of its own (`answer_context_requests`).
"""

from __future__ import annotations

from typing import Optional, Sequence

ANSWER_CONTEXT = "Answer:"
# tasks scored with the "Answer:" normalisation (lm-eval names, and the built-in suite's)
ANSWER_NORMALISED = ("boolq", "openbookqa", "mini_boolq")

# Table 3 (zero-shot) and Table 9 (MMLU, 5-shot) of Touvron et al. 2023, by preset
PAPER = {
    "7B": {"boolq": 76.5, "piqa": 79.8, "siqa": 48.9, "hellaswag": 76.1, "winogrande": 70.1,
           "arc_easy": 72.8, "arc_challenge": 47.6, "openbookqa": 57.2, "mmlu": 35.1},
    "13B": {"mmlu": 46.9},
    "33B": {"mmlu": 57.8},
    "65B": {"boolq": 85.3, "piqa": 82.8, "siqa": 52.3, "hellaswag": 84.2, "winogrande": 77.0,
            "arc_easy": 78.9, "arc_challenge": 56.0, "openbookqa": 60.2, "mmlu": 63.4},
}


def paper_number(preset: Optional[str], task: str) -> Optional[float]:
    """The paper's accuracy (%) for this preset and task, if it reports one."""
    return PAPER.get(preset or "", {}).get(task)


def uses_answer_context(task: str) -> bool:
    return task in ANSWER_NORMALISED


def paper_choice(task: str, loglikelihoods: Sequence[float], choices: Sequence[str],
                 answer_loglikelihoods: Optional[Sequence[float]] = None) -> int:
    """The index the paper's rule picks among ``choices`` (completion strings)."""
    if uses_answer_context(task):
        if answer_loglikelihoods is None:
            raise ValueError(f"{task}: needs the completions' log-likelihoods given "
                             f"{ANSWER_CONTEXT!r}")
        scores = [a - b for a, b in zip(loglikelihoods, answer_loglikelihoods)]
    else:
        scores = [ll / max(1, len(c)) for ll, c in zip(loglikelihoods, choices)]
    return max(range(len(scores)), key=scores.__getitem__)


def answer_context_requests(continuations: Sequence[str]) -> list[tuple[str, str]]:
    """The (context, continuation) pairs scoring each completion after "Answer:"."""
    return [(ANSWER_CONTEXT, c) for c in continuations]

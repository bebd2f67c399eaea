"""The shapes-world prompt grammar (SHAPES_WORLD.md §2): a closed, GenEval-style set of prompts.

Six tasks, one template each (``an`` replaces ``a`` before a vowel, so "an orange circle"):

=============  ===============================================  =========================================
task           template                                         example
=============  ===============================================  =========================================
single_object  a {color} {shape}                                a red circle
colors         a {color} {shape}  (scored on color)             a purple square
counting       {two,three,four} {color} {shape}s                three blue triangles
two_object     a {c1} {s1} and a {c2} {s2}      (s1 != s2)      a green square and a yellow circle
position       a {c1} {s1} {relation} a {c2} {s2}               a red circle above a blue square
color_attr     a {c1} {s} and a {c2} {s}        (c1 != c2)      a red triangle and a blue triangle
=============  ===============================================  =========================================

``single_object`` and ``colors`` share a template: :func:`parse` returns ``task="single_object"`` for
"a {color} {shape}"; the prompt-set files carry the task explicitly.

Pure Python + numpy: the renderer, the verifier and the built-in model's word-level tokenizer import
this module, so it stays free of torch.
"""

from __future__ import annotations

import difflib
import itertools
import re
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from flowalign.errors import UserError

# One palette for renderer and verifier. Chosen to be far apart from each other *and* in direction
# from the background (the verifier classifies anti-aliased pixels by the background→color line).
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.84, 0.06, 0.10),
    "green": (0.10, 0.62, 0.16),
    "blue": (0.10, 0.22, 0.90),
    "yellow": (0.98, 0.88, 0.08),
    "purple": (0.56, 0.12, 0.72),
    "orange": (1.00, 0.48, 0.00),
}
BACKGROUND: tuple[float, float, float] = (0.80, 0.80, 0.80)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TASKS: tuple[str, ...] = ("single_object", "colors", "counting", "two_object", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

_RELATION_TEXT: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
_NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
_NUMBER_WORDS: dict[str, int] = {v: k for k, v in _NUMBERS.items()}
_PLURALS: dict[str, str] = {s + "s": s for s in SHAPES}
_FUNCTION_WORDS: tuple[str, ...] = ("a", "an", "and", "to", "the", "left", "right", "of", "above", "below")


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one color and one shape."""

    color: str
    shape: str
    count: int = 1


@dataclass(frozen=True)
class Spec:
    """A parsed prompt. For ``position``, ``relation`` holds between objects[0] (subject) and objects[1] (reference)."""

    objects: tuple[ObjectSpec, ...]
    relation: Optional[str] = None
    task: str = "single_object"


# ----------------------------------------------------------------------------------------------- text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(o: ObjectSpec) -> str:
    if o.count == 1:
        return f"{_article(o.color)} {o.color} {o.shape}"
    return f"{_NUMBERS[o.count]} {o.color} {o.shape}s"


def to_prompt(spec: Spec) -> str:
    """Canonical prompt text; ``parse(to_prompt(s)) == s`` except that ``colors`` parses back as ``single_object``."""
    objs = spec.objects
    if spec.relation is not None:
        return f"{_noun_phrase(objs[0])} {_RELATION_TEXT[spec.relation]} {_noun_phrase(objs[1])}"
    return " and ".join(_noun_phrase(o) for o in objs)


def vocabulary() -> list[str]:
    """Every word the grammar can produce (for a word-level tokenizer): sorted and stable."""
    words = set(_FUNCTION_WORDS) | set(COLORS) | set(SHAPES) | set(_PLURALS) | set(_NUMBER_WORDS)
    return sorted(words)


def did_you_mean(word: str, words: Iterable[str]) -> str:
    """``"; did you mean 'square'?"`` for the one of ``words`` closest to ``word`` (difflib), or ``""`` when none is
    close. None more than a letter shorter than ``word`` is offered: a typo rarely drops two letters, and 'the' for
    'three' would mislead more than help."""
    candidates = [w for w in dict.fromkeys(words) if len(w) >= len(word) - 1 and w != word]
    close = difflib.get_close_matches(word, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_word(word: str, words: Iterable[str]) -> str:
    """``"unknown word 'squar'; did you mean 'square'?"``: the phrase the shapes grammars (and the shapes models'
    tokenizer) use for a word outside ``words``, a grammar's ``vocabulary()``. A word of the other shapes grammar
    ('two' in a motion prompt, 'moving' in an image one) is no typo: the phrase says whose word it is instead."""
    from flowalign.shapes import motion  # here, not at the top: motion imports this module

    words = list(words)
    for name, vocab in (("the shapes image grammar", vocabulary()), ("the shapes motion grammar", motion.vocabulary())):
        if word in vocab and set(vocab) != set(words):
            return f"unknown word {word!r}, a word of {name}"
    return f"unknown word {word!r}{did_you_mean(word, words)}"


def _outside(prompt: str, why: str) -> UserError:
    return UserError(f"prompt {prompt!r} is outside the shapes grammar: {why}")


def _grammar_hint() -> str:
    return (
        f"colors: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)}; "
        f"templates: 'a red circle', 'three blue triangles', 'a green square and a yellow circle', "
        f"'a red circle above a blue square'"
    )


def _parse_np(words: list[str], i: int, prompt: str) -> tuple[ObjectSpec, int]:
    """Parse one noun phrase starting at ``words[i]``; returns (object, next index)."""

    def need(j: int, what: str) -> str:
        if j >= len(words):
            raise _outside(prompt, f"ends early, expected {what} ({_grammar_hint()})")
        return words[j]

    first = need(i, "'a', 'an' or a number")
    if first in ("a", "an"):
        color = need(i + 1, "a color")
        shape = need(i + 2, "a shape")
        if color not in COLORS:
            raise _outside(prompt, f"expected a color after {first!r}, got {color!r} ({_grammar_hint()})")
        if shape not in SHAPES:
            raise _outside(prompt, f"expected a singular shape after {color!r}, got {shape!r} ({_grammar_hint()})")
        return ObjectSpec(color, shape, 1), i + 3
    if first in _NUMBER_WORDS:
        color = need(i + 1, "a color")
        plural = need(i + 2, "a plural shape")
        if color not in COLORS:
            raise _outside(prompt, f"expected a color after {first!r}, got {color!r} ({_grammar_hint()})")
        if plural not in _PLURALS:
            raise _outside(prompt, f"expected a plural shape after {color!r}, got {plural!r} ({_grammar_hint()})")
        return ObjectSpec(color, _PLURALS[plural], _NUMBER_WORDS[first]), i + 3
    raise _outside(prompt, f"expected 'a', 'an' or a number, got {first!r} ({_grammar_hint()})")


def parse(prompt: str) -> Spec:
    """Parse a prompt into a :class:`Spec`; raise :class:`UserError` naming the first unknown word.

    Lenient about case, surrounding whitespace, a trailing period and ``a``/``an``; strict about words.
    """
    if not isinstance(prompt, str):
        raise UserError(f"prompt must be a string, got {type(prompt).__name__}")
    text = prompt.strip().lower()
    if text.endswith("."):
        text = text[:-1].rstrip()  # "a red circle ." is the same prompt; a space left behind is no word
    words = re.split(r"\s+", text) if text else []
    if not words:
        raise _outside(prompt, f"it is empty ({_grammar_hint()})")
    vocab = vocabulary()
    known = set(vocab)
    for w in words:
        if w not in known:
            raise _outside(prompt, f"{unknown_word(w, vocab)} ({_grammar_hint()})")

    first, i = _parse_np(words, 0, prompt)
    if i == len(words):
        task = "counting" if first.count > 1 else "single_object"
        return Spec((first,), None, task)
    if first.count != 1:
        raise _outside(prompt, f"a counted phrase must stand alone, got more after {' '.join(words[:i])!r}")
    rest = words[i:]
    relation = None
    if rest[0] == "and":
        j = i + 1
    elif rest[0] in ("above", "below"):
        relation, j = rest[0], i + 1
    elif rest[:3] in (["to", "the", "left"], ["to", "the", "right"]) and rest[3:4] == ["of"]:
        relation, j = f"{rest[2]} of", i + 4
    else:
        raise _outside(
            prompt, f"expected 'and' or a relation (to the left of, to the right of, above, below) after "
            f"{' '.join(words[:i])!r}, got {rest[0]!r}"
        )
    second, k = _parse_np(words, j, prompt)
    if second.count != 1:
        raise _outside(prompt, "the second object must be singular ('a ...')")
    if k != len(words):
        raise _outside(prompt, f"unexpected words after the second object: {' '.join(words[k:])!r}")
    if relation is not None:
        task = "position"
    else:
        if (first.color, first.shape) == (second.color, second.shape):  # "a red circle and a red circle": two red
            task = "counting"  # circles, as the verifier counts it (color_attr needs two colours, §Tasks)
        else:
            task = "color_attr" if first.shape == second.shape else "two_object"
    return Spec((first, second), relation, task)


# ------------------------------------------------------------------------------------------ sampling


def enumerate_specs(task: str) -> list[Spec]:
    """Every distinct specification of ``task`` in a fixed order (the task's whole prompt space)."""
    cs, ss = tuple(COLORS), SHAPES
    if task in ("single_object", "colors"):
        return [Spec((ObjectSpec(c, s),), None, task) for c in cs for s in ss]
    if task == "counting":
        return [Spec((ObjectSpec(c, s, n),), None, task) for n in _NUMBERS for c in cs for s in ss]
    if task == "two_object":
        return [
            Spec((ObjectSpec(c1, s1), ObjectSpec(c2, s2)), None, task)
            for c1, s1, c2, s2 in itertools.product(cs, ss, cs, ss)
            if s1 != s2
        ]
    if task == "position":
        return [
            Spec((ObjectSpec(c1, s1), ObjectSpec(c2, s2)), r, task)
            for c1, s1, c2, s2 in itertools.product(cs, ss, cs, ss)
            if (c1, s1) != (c2, s2)
            for r in RELATIONS
        ]
    if task == "color_attr":
        return [
            Spec((ObjectSpec(c1, s), ObjectSpec(c2, s)), None, task)
            for s in ss
            for c1, c2 in itertools.product(cs, cs)
            if c1 != c2
        ]
    raise UserError(f"unknown shapes task {task!r} (tasks: {', '.join(TASKS)})")


def sample_spec(rng: np.random.Generator, task: Optional[str] = None) -> Spec:
    """A random specification of ``task`` (None: a task drawn uniformly from TASKS).

    Within a task the draw is uniform over the task's distinct specifications (as :func:`enumerate_specs`).
    """
    if task is None:
        task = TASKS[int(rng.integers(len(TASKS)))]
    nc, ns = len(COLORS), len(SHAPES)
    cs = tuple(COLORS)
    if task in ("single_object", "colors"):
        return Spec((ObjectSpec(cs[rng.integers(nc)], SHAPES[rng.integers(ns)]),), None, task)
    if task == "counting":
        n = (2, 3, 4)[int(rng.integers(3))]
        return Spec((ObjectSpec(cs[rng.integers(nc)], SHAPES[rng.integers(ns)], n),), None, task)
    if task == "two_object":
        s1, s2 = rng.choice(ns, size=2, replace=False)
        return Spec(
            (ObjectSpec(cs[rng.integers(nc)], SHAPES[s1]), ObjectSpec(cs[rng.integers(nc)], SHAPES[s2])), None, task
        )
    if task == "position":
        a, b = rng.choice(nc * ns, size=2, replace=False)  # distinct (color, shape) classes
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        return Spec(
            (ObjectSpec(cs[a // ns], SHAPES[a % ns]), ObjectSpec(cs[b // ns], SHAPES[b % ns])), rel, task
        )
    if task == "color_attr":
        c1, c2 = rng.choice(nc, size=2, replace=False)
        s = SHAPES[int(rng.integers(ns))]
        return Spec((ObjectSpec(cs[c1], s), ObjectSpec(cs[c2], s)), None, task)
    raise UserError(f"unknown shapes task {task!r} (tasks: {', '.join(TASKS)})")


def generate_prompts(n_per_task: int, seed: int, exclude: Iterable[str] = (), tasks: Iterable[str] = TASKS) -> list[dict]:
    """``n_per_task`` prompts per task as ``[{"prompt", "task"}]``, grouped by task in ``tasks`` order.

    Per task, the pool is the task's distinct prompts minus ``exclude``. If the pool holds at least
    ``n_per_task`` prompts they are drawn without replacement (no duplicates); otherwise the pool is
    repeated as whole shuffled passes, so every prompt appears ⌊n/|pool|⌋ or ⌈n/|pool|⌉ times.
    Deterministic given ``seed``.
    """
    exclude = set(exclude)
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    for task in tasks:
        pool = [to_prompt(s) for s in enumerate_specs(task)]
        pool = [p for p in pool if p not in exclude]
        if not pool:
            raise UserError(f"no prompts of task {task!r} remain after exclusion")
        if len(pool) >= n_per_task:
            idx = rng.choice(len(pool), size=n_per_task, replace=False)
        else:
            passes = -(-n_per_task // len(pool))
            idx = np.concatenate([rng.permutation(len(pool)) for _ in range(passes)])[:n_per_task]
        out.extend({"prompt": pool[int(i)], "task": task} for i in idx)
    return out

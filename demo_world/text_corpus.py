"""A text-only instruction set built from English that exists offline: the docstrings of Python's
standard library, plus templated tasks (repeat, count words, first word, reverse) over their sentences.

The drafter's first training stage needs text-only data, and the target must answer text-only
prompts. The corpus is a pure function of the interpreter's stdlib, so it is the same on every
machine with the same Python. Nothing here touches images or tokens.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import random
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache

from demo_world.tasks import NUMBERS, Example

# A fixed list (not pkgutil discovery) so the corpus does not change when packages are installed.
STDLIB_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip",
    "hashlib", "heapq", "html", "io", "inspect", "ipaddress", "itertools", "json", "logging", "math",
    "operator", "os", "os.path", "pathlib", "pprint", "queue", "random", "re", "secrets", "shlex",
    "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "typing", "unittest", "urllib.parse",
    "uuid", "weakref", "zipfile", "zlib",
)
MAX_ANSWER_WORDS = 40
TEXT_KIND = "text"


@dataclass(frozen=True)
class Docstring:
    """The first paragraph of one public object's docstring."""

    qualname: str  # e.g. "json.dumps"
    text: str


def _first_paragraph(doc: str) -> str | None:
    paragraph = doc.strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    # Skip signatures-only docs ("f(x, y) -> z"), doctest lines and non-ASCII text.
    if len(text.split()) < 4 or ">>>" in text or "->" in text or not text.isascii():
        return None
    if not re.search(r"[a-z]{3,} [a-z]{3,}", text):
        return None
    words = text.split()
    if len(words) > MAX_ANSWER_WORDS:
        cut = " ".join(words[:MAX_ANSWER_WORDS])
        end = cut.rfind(". ")
        text = cut[: end + 1] if end > 40 else cut + " ..."
    return text


@lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[Docstring, ...]:
    """Public functions and classes of `STDLIB_MODULES` with a usable docstring, sorted by name."""
    found: dict[str, str] = {}
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            with warnings.catch_warnings():  # typing.io / typing.re warn when their docs are read
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(obj) or ""
            text = _first_paragraph(doc)
            if text is not None:
                found.setdefault(f"{module_name}.{attr}", text)
    return tuple(Docstring(q, t) for q, t in sorted(found.items()))


def is_held_out(key: str) -> bool:
    """A stable 10% split by name, so held-out items never appear in training."""
    return hashlib.sha256(key.encode()).digest()[0] < 26


def sentences(text: str) -> list[str]:
    """Plain sentences of 4-14 words from `text` (for the templated tasks)."""
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        words = sentence.split()
        if 4 <= len(words) <= 14 and sentence.endswith("."):
            out.append(sentence)
    return out


def make_text_example(doc: Docstring, rng: random.Random) -> Example:
    """One text-only instruction about `doc`: explain it, or a templated task over one of its sentences."""
    choices = sentences(doc.text)
    task = rng.randrange(5) if choices else 0
    if task == 0:
        prompt = rng.choice((f"What does {doc.qualname} do in Python?", f"Explain {doc.qualname}.",
                             f"What is {doc.qualname} for?"))
        return Example(TEXT_KIND, prompt, doc.text)
    sentence = rng.choice(choices)
    words = sentence.rstrip(".").split()
    if task == 1:
        return Example(TEXT_KIND, f"Repeat this sentence: {sentence}", sentence)
    if task == 2:
        n = len(words)
        count = NUMBERS[n] if n < len(NUMBERS) else str(n)
        return Example(TEXT_KIND, f"How many words are in this sentence? {sentence}",
                       f"The sentence has {count} words.")
    if task == 3:
        return Example(TEXT_KIND, f"What is the first word of this sentence? {sentence}",
                       f'The first word is "{words[0]}".')
    return Example(TEXT_KIND, f"Reverse the order of the words: {sentence}", " ".join(reversed(words)) + ".")


def split_docstrings(held_out: bool) -> tuple[Docstring, ...]:
    """The training (`held_out=False`) or held-out part of the docstring corpus."""
    return tuple(d for d in stdlib_docstrings() if is_held_out(d.qualname) == held_out)

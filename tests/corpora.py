"""Small corpora on disk for the data tests: text documents and documented Python functions."""
from __future__ import annotations

import textwrap
from pathlib import Path

PY_SOURCE = textwrap.dedent('''\
    import functools


    @functools.cache
    def add(a, b):
        """Add two numbers."""
        # a comment that belongs to the body
        return a + b


    class Box:
        def size(self):
            """How many items.

            Counts them all.
            """
            n = len(self.items)
            return n

        def only_doc(self):
            """No body after me."""


    async def fetch(url):
        """Fetch a url."""
        return await get(url)


    def undocumented(x):
        return x
    ''')


def sample_text(i: int) -> str:
    """40 lines of words, different for each `i`."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return "\n".join(f"line {j}: " + " ".join(words[(i + j + k) % 8] for k in range(6)) for j in range(40)) + "\n"


def write_text_corpus(root: Path) -> Path:
    """8 documents: .txt/.md files in `root`, one nested, plus a .csv that readers ignore."""
    (root / "sub").mkdir(parents=True)
    for i in range(6):
        (root / f"doc{i}.txt").write_text(sample_text(i))
    (root / "notes.md").write_text("# Notes\n\n" + sample_text(7))
    (root / "sub" / "deep.txt").write_text(sample_text(9))
    (root / "ignored.csv").write_text("a,b\n1,2\n")
    return root


def write_py_corpus(root: Path) -> Path:
    """12 .py files of 4 documented functions each (48 pairs) and one file that does not parse."""
    root.mkdir(parents=True)
    for i in range(12):
        funcs = "\n\n".join(
            f'def f{i}_{k}(x):\n    """Return x plus {k}."""\n    y = x + {k}\n    return y\n' for k in range(4)
        )
        (root / f"mod{i}.py").write_text(funcs)
    (root / "broken.py").write_text("def oops(:\n")
    return root

"""Check that rewriting BENCHMARKS.md lost no figure.

Every number in the old page must appear in one of the new files (the current page or the history),
and, as a guard against figures typed in by hand, every number on the new current page should appear
in the old page (the script lists those that do not, for a person to check).

    git show REV:BENCHMARKS.md > /tmp/old.md
    python benchmarks/check_benchmarks_page.py /tmp/old.md BENCHMARKS.md docs/benchmarks-history.md

Exit status 1 when a figure of the old page is missing from every new file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

# A figure: digits with optional thousands commas, decimals and exponent ("1,428", "0.0055", "9.34e-04").
# The lookarounds keep a number inside a longer token (a commit hash, "x1.068") from matching a part of it.
NUMBER = re.compile(r"(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?(?![\w])")


def figures(text: str) -> set[str]:
    """Every number written in `text`, as written."""
    return set(NUMBER.findall(text))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the page before the rewrite")
    parser.add_argument("new", type=Path, nargs="+", help="the current page first, then the history file(s)")
    args = parser.parse_args(argv)

    old = figures(args.old.read_text())
    new_texts = [path.read_text() for path in args.new]
    kept = set().union(*(figures(text) for text in new_texts))
    missing = sorted(old - kept)
    print(f"{len(old)} distinct numbers in {args.old}; {len(old) - len(missing)} found in the new files")
    if missing:
        print("missing:", " ".join(missing))

    unexplained = sorted(figures(new_texts[0]) - old)
    print(f"{len(unexplained)} numbers on {args.new[0]} that are not in {args.old}:", " ".join(unexplained))
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())

"""The README: the two commands, every package in its layout table, and no figure of its own (each one it quotes
is in docs/results.md, the one source of results)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# a result: 0.123, a signed +1.5 / -0.003, or a percentage; not versions (Python 3.11) or arXiv ids
FIGURE = re.compile(r"(?<![\w.])(?:[+-]?0\.\d+|[+-]\d+\.\d+|\d+(?:\.\d+)?%)")


def figures(text: str) -> set[str]:
    return set(FIGURE.findall(text))


def test_every_figure_the_readme_quotes_is_in_results_md():
    quoted = figures((REPO / "README.md").read_text())
    assert quoted, "the README quotes no result"
    results = (REPO / "docs/results.md").read_text()
    missing = {f for f in quoted if not re.search(rf"(?<![\w.]){re.escape(f)}(?![\d])", results)}
    assert not missing, f"figures in README.md that docs/results.md does not hold: {sorted(missing)}"


def test_a_figure_is_found():
    assert figures("gain +0.092 [0.087, 0.098], 30% of the gap; Python 3.11, arXiv 2502.21011, -1.5") == \
        {"+0.092", "0.087", "0.098", "30%", "-1.5"}


def test_the_readme_names_the_two_commands_and_every_package():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme  # CI calls make test
    packages = {str(p.parent.relative_to(REPO)) for p in REPO.glob("magnet/*/__init__.py")} | {"sharding", "launch"}
    layout = readme[readme.index("## Layout"):]
    layout = layout[:layout.index("\n## ")]
    missing = {p for p in packages if f"`{p}/`" not in layout}
    assert not missing, f"packages without a line in the README's layout table: {sorted(missing)}"

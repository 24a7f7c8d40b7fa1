"""Citations a reader can follow: every ``docs/hf-semantics.md §N`` in the repository resolves.

The modules, tests and lessons cite the HF facts they rely on as ``docs/hf-semantics.md §N``
(one or more section numbers, e.g. ``§4, §5``). This test finds every such citation in the
tracked text files and checks that the document has a ``## §N`` heading for each number, so
a renumbered or deleted section cannot leave a citation dangling. It also checks that no file
still cites material outside the repository (the project's old private notes).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "hf-semantics.md"
# "docs/hf-semantics.md §4", "docs/hf-semantics.md §4, §5", "docs/hf-semantics.md\n# §7" (a wrapped comment)
CITATION = re.compile(r"hf-semantics\.md(?:``)?[\s#]*((?:§\d+(?:,\s*|\s+and\s+|\s*)?)+)")


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts]
    return [REPO / n for n in names if n.endswith((".py", ".md", ".toml")) and (REPO / n).is_file()]


def doc_sections() -> set[int]:
    return {int(m) for m in re.findall(r"^## §(\d+)\b", DOC.read_text(encoding="utf-8"), flags=re.M)}


def citations() -> list[tuple[str, int]]:
    found = []
    for path in tracked_text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in CITATION.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            for number in re.findall(r"§(\d+)", match.group(1)):
                found.append((f"{path.relative_to(REPO)}:{line}", int(number)))
    return found


def test_the_document_has_sections_0_to_15() -> None:
    assert doc_sections() >= set(range(16))


def test_every_citation_names_an_existing_section() -> None:
    found = citations()
    assert len(found) >= 15, f"expected the package, tests and lessons to cite the document; found {found}"
    sections = doc_sections()
    dangling = [(where, n) for where, n in found if n not in sections]
    assert not dangling, f"citations of sections that docs/hf-semantics.md does not have: {dangling}"


@pytest.mark.parametrize(
    "phrase", ["shared reference", "shared/reference", "CONTRACT.md", "qwen2-hf-semantics.md"]
)
def test_nothing_cites_notes_outside_the_repository(phrase: str) -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in tracked_text_files()
        if p != Path(__file__) and phrase in p.read_text(encoding="utf-8", errors="replace")
    ]
    assert not offenders, f"{phrase!r} (not in the repository) is cited by {offenders}"

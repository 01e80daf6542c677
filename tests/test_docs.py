"""docs/ARCHITECTURE.md describes the code that exists (issue 13 item 10): every file and name it
points at is there, the sections that docstrings cite exist, and nothing cites a design document
the repository does not hold."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _tracked(*suffixes: str) -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / p for p in out.splitlines() if p.endswith(suffixes)]
    return [p for p in files if p.exists()]


def test_every_path_in_the_architecture_exists() -> None:
    text = DOC.read_text()
    paths = set(re.findall(r"\b((?:partitioner|passes|cost_models|tools|tests)(?:/[\w.]+)+)", text))
    assert len(paths) > 30
    missing = sorted(p for p in paths if not (ROOT / p.rstrip("/")).exists())
    assert not missing, missing


def test_every_named_definition_in_the_architecture_exists() -> None:
    # "path.py: name" and "path.py: NAME" name a function, class or module-level constant there
    text = DOC.read_text()
    refs = set(re.findall(r"([\w/]+\.py): ([A-Za-z_][\w]*)", text))
    assert len(refs) > 8
    missing = []
    for path, name in sorted(refs):
        source = (ROOT / path).read_text()
        if not re.search(rf"^\s*(?:def|class) {name}\b|^{name}\b\s*(?::[^=\n]*)?=", source, re.M):
            missing.append(f"{path}: {name}")
    assert not missing, missing


def test_cited_sections_exist() -> None:
    headings = {h.strip() for h in re.findall(r"^#+ (.+)$", DOC.read_text(), re.M)}
    cited = []
    for path in _tracked(".py", ".md"):
        for section in re.findall(r'docs/ARCHITECTURE\.md, "([^"]+)"', path.read_text()):
            cited.append(section)
            assert any(h == section or h.startswith(section) for h in headings), (path, section, headings)
    assert cited  # docstrings do point into it


def test_nothing_cites_a_document_outside_the_repository() -> None:
    bad = []
    for path in _tracked(".py", ".md", ".toml", ".sh", ".json", ".cfg", ".txt"):
        if path == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        for needle in ("DESIGN.md", "../shared"):
            if needle in text:
                bad.append(f"{path.relative_to(ROOT)}: {needle}")
    assert not bad, bad

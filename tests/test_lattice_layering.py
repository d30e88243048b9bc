"""Layering: the lattice op knows nothing of the CRF built on it (crf -> lattice_op, never the
other way). Every text file under src/lattice_op, Python and C++ alike, is searched for the
CRF's vocabulary and for imports of the CRF package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

LATTICE_OP = Path(__file__).resolve().parents[1] / "src" / "lattice_op"
# The project's names hold "crf" without meaning the CRF: the distribution and import names,
# and the crf3d prefix of the C++ namespace, the ops and the environment variables.
PROJECT_NAMES = re.compile(r"crf[-_]rnn[-_]3d|crf3d", re.IGNORECASE)
FORBIDDEN = {
    "the CRF": re.compile(r"\bCRFs?\b", re.IGNORECASE),
    "the mean field": re.compile(r"mean[\s_-]*field|meanfield", re.IGNORECASE),
    "unaries": re.compile(r"unar(y|ies)", re.IGNORECASE),
    "compatibility": re.compile(r"compatibility", re.IGNORECASE),
}
CRF_IMPORT = re.compile(
    r"crf_rnn_3d\.crf\b|from\s+crf_rnn_3d\s+import\s+crf\b|from\s+\.\.\s*import\s+crf\b"
    r"|from\s+\.\.crf\b|#\s*include\s*[\"<][^\">]*crf/",
)


def lattice_files() -> list[Path]:
    """Every text file under src/lattice_op (compiled libraries and caches skipped)."""
    files = []
    for path in sorted(LATTICE_OP.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts or path.suffix in (".so", ".pyc"):
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_the_search_covers_python_and_cpp() -> None:
    names = {p.name for p in lattice_files()}
    assert {"lattice.py", "separable.py", "permutohedral.cc", "gaussian.h", "kernels.cc"} <= names


@pytest.mark.parametrize("path", lattice_files(), ids=lambda p: str(p.relative_to(LATTICE_OP)))
def test_lattice_op_does_not_know_the_crf(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not CRF_IMPORT.search(text), f"{path} imports or includes the CRF package"
    plain = PROJECT_NAMES.sub("", text)
    for lineno, line in enumerate(plain.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            assert not pattern.search(line), f"{path}:{lineno} mentions {what}: {line.strip()}"


def test_the_search_would_catch_a_mention() -> None:
    """The patterns themselves find what they are meant to find (and only that)."""
    samples = {
        "the CRF's smoothness kernel": "the CRF",
        "every mean-field iteration": "the mean field",
        "Crf3dMeanField": "the mean field",
        "unaries [B, K]": "unaries",
        "the compatibility matrix": "compatibility",
    }
    for text, what in samples.items():
        assert FORBIDDEN[what].search(PROJECT_NAMES.sub("", text)), text
    assert CRF_IMPORT.search("from crf_rnn_3d.crf import functional")
    assert CRF_IMPORT.search('#include "crf/csrc/mean_field.h"')
    clean = "crf_rnn_3d.lattice_op, Crf3dLatticeFilter, CRF3D_LATTICE_MAX_BYTES, crf-rnn-3d"
    assert not any(p.search(PROJECT_NAMES.sub("", clean)) for p in FORBIDDEN.values())

"""What the formatter and linter (ruff, run by .ci/run) have no rule for: one statement per line
means no tuple or conditional expression used as a statement and no backslash continuation."""

import ast
import glob
import io
import os
import tokenize

import pytest
from conftest import ROOT

SOURCES = sorted(
    os.path.relpath(p, ROOT)
    for p in glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "tests", "*.py"))
)


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("path", SOURCES)
def test_no_expression_used_as_a_statement(path):
    for node in ast.walk(ast.parse(read(path))):
        if isinstance(node, ast.Expr):
            kind = type(node.value).__name__
            assert kind not in ("Tuple", "IfExp", "BoolOp"), (
                f"{path}:{node.lineno}: a {kind} statement"
            )


@pytest.mark.parametrize("path", SOURCES)
def test_no_backslash_continuation_or_semicolon(path):
    text = read(path)
    in_tokens = set()  # rows that end inside a string (a docstring may show a shell command's '\')
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.STRING:
            in_tokens.update(range(tok.start[0], tok.end[0]))
        assert not (tok.type == tokenize.OP and tok.string == ";"), f"{path}:{tok.start[0]}: ';'"
    for row, line in enumerate(text.splitlines(), 1):
        if line.rstrip().endswith("\\") and row not in in_tokens:
            assert line.lstrip().startswith("#"), f"{path}:{row}: backslash continuation"


@pytest.mark.parametrize("path", [p for p in SOURCES if not p.startswith("tests")])
def test_lessons_are_ascii_so_help_reads_them_on_any_locale(path):
    read(path).encode("ascii")

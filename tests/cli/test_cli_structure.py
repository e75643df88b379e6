"""The command line's shared pieces: one progress bar, and modules that import each other one way only."""

from __future__ import annotations

import ast
import io
from pathlib import Path

from featureviz.cli.progress import ProgressBar

CLI = Path(__file__).resolve().parents[2] / "service" / "cli"


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featureviz.cli."):
            found.add(node.module.removeprefix("featureviz.cli."))
    return found


def test_cli_modules_have_no_import_cycle():
    graph = {p.stem: _imports(p) for p in CLI.glob("*.py") if p.stem not in ("__init__", "__main__")}

    def reach(start, seen):
        for nxt in graph.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    cycles = [name for name in graph if name in reach(name, set())]
    assert not cycles, {name: graph[name] for name in cycles}


def test_one_progress_bar_class_in_the_cli():
    defined = [p.name for p in CLI.glob("*.py") if "class ProgressBar" in p.read_text()]
    assert defined == ["progress.py"]


def test_progress_bar_off_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar("upload x", stream=stream)
    for done in range(0, 101):
        bar.update(done, 100, "note")
    bar.close("ok")
    lines = stream.getvalue().splitlines()
    assert lines[:-1] == [f"upload x: {k * 10}/100 note" for k in range(11)]
    assert lines[-1].startswith("upload x: done in ") and lines[-1].endswith(" ok")
    quiet = io.StringIO()
    unlabelled = ProgressBar(stream=quiet)
    unlabelled.update(5, 10)
    unlabelled.close()
    assert quiet.getvalue() == "" and not unlabelled.enabled


def test_progress_bar_on_a_terminal_redraws_one_line():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = ProgressBar(stream=stream)
    bar.update(0, 4, "objective 0.1")
    bar.update(4, 4, "objective 0.5")  # the last step is always drawn
    bar.close()
    text = stream.getvalue()
    assert text.count("\r") == 2 and "4/4 objective 0.5" in text and text.endswith("\n") and "\n" not in text[:-1]

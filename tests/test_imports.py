"""The package's shape (docs/architecture.md): no import circle, a command line that answers
before torch loads, nothing read from tests/, folders and files of a readable size."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moe_tune"
MAX_ENTRIES, MAX_LINES = 12, 450
DEFERRING = {"moe_tune.cli"}  # imports inside functions on purpose: --help answers before torch loads


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def package_imports() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """({module: the moe_tune modules it imports}, [(module, imported, line) inside a function])."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph, local = {m: set() for m in modules}, []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_tune"):
                targets = [f"{node.module}.{a.name}" for a in node.names]
                targets = [t if t in modules else node.module for t in targets]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("moe_tune")]
            else:
                continue
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
                    if node.col_offset > 0:
                        local.append((name, target, node.lineno))
    return graph, local


def test_no_import_circle():
    graph, _ = package_imports()
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            assert state.get(dep) != "open", "import circle: " + " -> ".join(path[path.index(dep):] + [m, dep]) \
                if dep in path else f"import circle through {m} -> {dep}"
            if dep not in state:
                visit(dep, path + [m])
        state[m] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_package_imports_are_at_the_top_except_where_deferred_on_purpose():
    _, local = package_imports()
    assert [(m, t, line) for m, t, line in local if m not in DEFERRING] == []


def test_help_and_the_recipe_schema_import_no_torch():
    """--help answers at once; a recipe's sections are checked before torch loads (only its
    ``sft`` keys need TRL's SFTConfig, imported when they are checked)."""
    code = ("import sys\nfrom moe_tune import cli\nfor argv in (['--help'], ['train', '--help']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "import moe_tune.recipe\n"
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'peft', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_nothing_in_the_package_reads_the_tests_folder():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
        assert not any(s == "tests" or s.startswith("tests/") for s in strings), path
        assert "import tests" not in path.read_text() and "from tests" not in path.read_text(), path


def test_folders_and_files_stay_readable():
    entries = [p for p in PACKAGE.iterdir() if p.name != "__pycache__"]
    assert len(entries) <= MAX_ENTRIES, sorted(p.name for p in entries)
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_test_groups_reach_xdists_scheduler(request):
    """Under `--dist loadgroup` (make test, make check) the scheduler reads each test's group
    from its id (tests/conftest.py adds the groups). pytest 9.2 stopped showing xdist's rewritten
    ids: every test ran as its own unit, files' fixtures were built on both workers and shared
    runs trained twice, with no error. pyproject.toml's dev extra keeps a pytest that shows them."""
    if not getattr(request.config.option, "loadgroup", False):
        pytest.skip("not under pytest-xdist's --dist loadgroup")
    assert request.node.nodeid.endswith("@test_imports"), request.node.nodeid

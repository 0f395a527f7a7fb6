"""The layout is part of the specification: the method at the top level, everything else in `infra/`.

A reader opens the repository and finds exactly the method's files (plus the user-facing generate.py); the five
method files import only torch, the standard library, bitsandbytes and each other, so each can be read (and
copied) on its own; and every file stays small enough to hold in mind."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD = ("model", "rope", "attention", "quant", "lora")
TOP_LEVEL = METHOD + ("train", "data", "eval", "generate")
MAX_LINES = dict(model=360, rope=160, attention=220, quant=340, lora=260, train=320, data=280, eval=320,
                 generate=260)


def lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth of the file (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_top_level_is_the_method_and_the_user_facing_scripts():
    assert {p.stem for p in ROOT.glob("*.py")} == set(TOP_LEVEL)


def test_method_files_import_only_torch_the_standard_library_bitsandbytes_and_each_other():
    allowed = set(sys.stdlib_module_names) | {"torch", "bitsandbytes", "__future__"} | set(METHOD)
    for name in METHOD:
        extra = imported_modules(ROOT / f"{name}.py") - allowed
        assert not extra, f"{name}.py imports {sorted(extra)}"


def test_no_run_time_file_imports_the_reference_implementations():
    runtime = [*ROOT.glob("*.py"), *(ROOT / "infra").glob("*.py")]
    for path in runtime:
        bad = imported_modules(path) & {"transformers", "peft", "accelerate", "datasets", "trl"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_files_stay_small_enough_to_read():
    sizes = {name: lines(ROOT / f"{name}.py") for name in TOP_LEVEL}
    too_long = {name: n for name, n in sizes.items() if n > MAX_LINES[name]}
    assert not too_long, f"over budget: {too_long}"
    assert sum(sizes.values()) <= 2400, f"the top level has {sum(sizes.values())} lines"


def test_the_test_tree_has_the_method_layout():
    """One specification per method file; the package's format, download, robustness and CLI tests beside it."""
    for name in METHOD + ("train", "data", "eval", "generate"):
        assert (ROOT / "tests" / f"test_{name}.py").is_file()
    assert any((ROOT / "tests" / "infra").glob("test_*.py"))

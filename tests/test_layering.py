"""The package's import graph points one way (docs/architecture.md, house-style.md).

Parses every module under src/qwen2vl with `ast` and fails on a forbidden edge, on any import of
transformers / vllm, and on `from x import _private` across modules.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qwen2vl"

# layer of each top-level unit -> units it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "processing": {"config", "errors"},
    "model": {"config", "errors", "native"},
    "weights": {"config", "errors", "model", "mapped"},
    "quantize": {"config", "errors", "model", "mapped", "native"},
    "mapped": set(),
    "native": set(),  # C kernels built on first use + their torch wrappers; torch and stdlib only
    "generation": {"config", "errors", "model", "weights"},
    "builtin": {"config", "errors"},
    "engine": {"config", "errors", "model", "weights", "generation", "processing", "quantize"},
    "server": {"config", "errors", "engine", "processing", "generation"},
    "batch": {"config", "errors", "engine", "processing", "generation", "model", "weights", "quantize"},
    "train": {"config", "errors", "model", "weights", "processing", "generation"},
    "synthetic": {"errors", "config"},
    "cli": None,  # cli may import anything; nothing imports cli
    "__init__": set(),  # re-exports lazily through importlib, no static imports
    "__main__": {"cli"},
}
BANNED = ("transformers", "vllm", "sglang", "lmdeploy")
# The upward edges we allow, only inside a function body (checked below): the model's `generate`,
# `from_pretrained` and `save_pretrained` methods import the generation loop and the checkpoint
# reader lazily, so that `model.generate(**inputs)` and `Model.from_pretrained(...)` work as in
# transformers without the model layer depending on those layers at import time.
LAZY_UPWARD = {
    ("model/qwen2vl.py", "qwen2vl.generation.generate"),
    ("model/qwen2vl.py", "qwen2vl.weights"),
}


def _unit(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _function_import_lines(tree: ast.AST) -> set[int]:
    """Line numbers of imports nested inside a function or method body."""
    lines = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    lines.add(node.lineno)
    return lines


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, imported names, line) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(("qwen2vl",) + path.relative_to(SRC).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((module, [a.name for a in node.names], node.lineno))
    return found


def test_sources_exist():
    assert (SRC / "errors.py").exists()
    assert len(list(SRC.rglob("*.py"))) >= 5


def test_import_edges_point_one_way():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        unit = _unit(path)
        in_function = _function_import_lines(ast.parse(path.read_text()))
        allowed = ALLOWED.get(unit, "missing")
        if allowed == "missing":
            problems.append(f"{path.relative_to(SRC)}: unit {unit!r} has no entry in ALLOWED")
            continue
        for module, names, line in _imports(path):
            top = module.split(".")[0]
            if top in BANNED:
                problems.append(f"{path.relative_to(SRC)}:{line}: imports {module} (banned at run time)")
            if top != "qwen2vl":
                continue
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else "__init__"
            if target == "cli" and unit != "__main__":
                problems.append(f"{path.relative_to(SRC)}:{line}: imports cli; nothing may import cli")
            lazy_ok = (str(path.relative_to(SRC)), module) in LAZY_UPWARD and line in in_function
            if allowed is not None and target != unit and target not in allowed and not lazy_ok:
                problems.append(f"{path.relative_to(SRC)}:{line}: {unit} -> {target} is not an allowed edge")
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != unit:
                    problems.append(f"{path.relative_to(SRC)}:{line}: imports private {module}.{name}")
    assert not problems, "\n".join(problems)


def test_import_qwen2vl_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, qwen2vl; qwen2vl.Qwen2VLConfig; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""The package's layers: imports between its subpackages run one way, from the top (tools-facing
packages) down to the bottom (utilities), and no module imports project code inside a function."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mask_former"

# A subpackage (or top-level module) may import only from lower ranks.
RANKS = {
    "utils": 0, "tasks": 0, "config": 0,
    "layers": 1, "data": 1, "model_zoo": 1,
    "modeling": 2,
    "checkpoint": 3, "evaluation": 3, "solver": 3, "test_time_augmentation": 3,
    "engine": 4, "demo": 4, "export": 4,
    "cli": 5, "__init__": 6,
}


def project_imports(path: Path):
    """(imported subpackage, line, inside a function?) of every import of project code."""
    module_parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package_parts = module_parts[:-1]
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package_parts[: len(package_parts) - (node.level - 1)]
            if node.module:
                names = [".".join(base + node.module.split("."))]
            else:
                names = [".".join(base + [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mask_former"):
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("mask_former")]
        for name in names:
            parts = name.split(".")
            yield (parts[1] if len(parts) > 1 else "__init__"), node.lineno, id(node) in in_function


def subpackage(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0] if len(parts) > 1 or parts[0] != "__init__" else "__init__"


def test_every_subpackage_has_a_rank():
    found = {subpackage(p) for p in PACKAGE.rglob("*.py")}
    assert found <= set(RANKS), f"give these a rank in RANKS: {sorted(found - set(RANKS))}"


def test_imports_run_downwards_only():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = subpackage(path)
        for target, line, _ in project_imports(path):
            if target != source and RANKS[target] >= RANKS[source]:
                violations.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} "
                                  f"(rank {RANKS[source]}) imports {target} (rank {RANKS[target]})")
    assert not violations, "\n".join(violations)


def test_no_function_level_imports_of_project_code():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for _, line, in_function in project_imports(path) if in_function]
    assert not found, "imports of project code inside functions: " + ", ".join(found)

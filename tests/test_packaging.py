"""Every package folder is mapped into the longserve namespace, and the dependency direction holds."""

import ast
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ["server", "engine", "kernels", "policies", "bench"]


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {pathlib.Path(v).as_posix(): k for k, v in cfg["package-dir"].items()}
    for top in FOLDERS:
        for init in (ROOT / top).rglob("__init__.py"):
            folder = init.parent.relative_to(ROOT).as_posix()
            assert folder in mapped, f"{folder}/ has an __init__.py but is not in pyproject's package-dir"
            assert mapped[folder] in cfg["packages"], f"{mapped[folder]} missing from pyproject's packages"


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                parts = path.relative_to(ROOT).parent.parts
                base = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
                names.add(".".join(("longserve", *base, *(node.module.split(".") if node.module else [])))
                          .replace("longserve.", "", 1).split(".")[0])
            elif node.module:
                names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _first_party(names: set[str]) -> set[str]:
    out = set()
    for n in names:
        if n.startswith("longserve."):
            out.add(n.split(".")[1])
        elif n in FOLDERS:
            out.add(n)
    return out


ALLOWED = {
    "kernels": {"kernels"},
    "engine": {"engine", "kernels"},
    "policies": {"policies", "engine", "kernels"},
    "bench": {"bench", "engine", "kernels", "server"},
    "server": {"server", "engine", "kernels"},
}


def test_dependency_direction():
    for top, allowed in ALLOWED.items():
        for path in (ROOT / top).rglob("*.py"):
            used = _first_party(_imports(path))
            if path == ROOT / "server" / "cli.py":
                continue  # the CLI dispatcher names subcommand modules by string only
            assert used <= allowed, f"{path.relative_to(ROOT)} imports {sorted(used - allowed)} (not allowed from {top}/)"


def test_kernels_import_no_server_or_engine_packages():
    forbidden = ("fastapi", "uvicorn", "pydantic")
    for top in ("kernels", "engine", "policies", "bench"):
        for path in (ROOT / top).rglob("*.py"):
            for name in _imports(path):
                assert not name.split(".")[0] in forbidden, f"{path.relative_to(ROOT)} imports {name}"

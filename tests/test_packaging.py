"""Every package folder is mapped into the longserve namespace, and the dependency direction holds."""

import ast
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDERS = ["server", "engine", "kernels", "policies", "bench", "evals", "vllm_plugin"]


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
    "evals": {"evals", "engine", "kernels", "policies", "bench"},
    "server": {"server", "engine", "kernels"},
    "vllm_plugin": {"vllm_plugin", "kernels"},
}


def test_dependency_direction():
    for top, allowed in ALLOWED.items():
        for path in (ROOT / top).rglob("*.py"):
            used = _first_party(_imports(path))
            if path == ROOT / "server" / "cli.py":
                continue  # the CLI dispatcher names subcommand modules by string only
            assert used <= allowed, f"{path.relative_to(ROOT)} imports {sorted(used - allowed)} (not allowed from {top}/)"


def test_kernels_import_no_server_or_engine_packages():
    forbidden = ("fastapi", "uvicorn", "pydantic", "vllm")  # vllm: only the plugin (its own environment)
    for top in ("kernels", "engine", "policies", "bench", "evals"):
        for path in (ROOT / top).rglob("*.py"):
            for name in _imports(path):
                assert not name.split(".")[0] in forbidden, f"{path.relative_to(ROOT)} imports {name}"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """module -> first-party modules it imports anywhere in its body (function-level imports included)."""
    paths = {_module_name(p): p for top in FOLDERS for p in (ROOT / top).rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    target = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                elif node.module and node.module.startswith("longserve."):
                    target = node.module.split(".")[1:]
                else:
                    continue
                base = ".".join(target)
                deps |= {m for m in [base, *(f"{base}.{a.name}" for a in node.names)] if m in paths}
            elif isinstance(node, ast.Import):
                deps |= {a.name.removeprefix("longserve.") for a in node.names} & set(paths)
        graph[name] = deps - {name}
    return graph


def test_no_import_cycles():
    graph = _module_graph()
    assert graph["bench.throughput"], "the import graph reader found nothing"  # guard the reader itself
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for dep in sorted(graph[module]):
            visit(dep, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_cli_help_does_not_import_torch():
    """`longserve --help` and every subcommand's --help build the parser without importing torch."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from longserve.server.cli import EXTERNAL_COMMANDS, build_parser\n"
            "parser = build_parser()\n"
            "parser.format_help()\n"
            "for name in [*EXTERNAL_COMMANDS, 'generate']:\n"
            "    try:\n"
            "        parser.parse_args([name, '--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'triton') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_docs_speak_of_the_project_only():
    """README and docs/ describe the project, not who wrote it or on which borrowed machine."""
    import re

    pattern = re.compile(r"this session|the session that|sessions? (?:of|that) wrote|workplace|not drawn|"
                         r"no GPU was available|the task that wrote|helper (?:session|agent)|was lent", re.I)
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.relative_to(ROOT)}:{number}: {line.strip()}"

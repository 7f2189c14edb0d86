"""Every third-party package that the packaged code imports is declared in pyproject.toml
itself, not merely installed as some other package's dependency: in [project] dependencies,
or in the extra of the modules that need it. Read from the source with ast; the installed
distributions say which distribution provides an import."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# modules, by the last part of their dotted name, that only an extra's install needs
MODULES_OF_EXTRA = {"stack": {"stack", "objectstore"}}
# TensorFlow's CPU or CUDA build: exactly one of these extras is installed
# (tool.uv.conflicts), so any module may import what they declare.
ONE_OF_EXTRAS = ("cpu", "gpu")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    return {canonical(re.match(r"[A-Za-z0-9._-]+", r.strip()).group()) for r in requirements}


def third_party_imports(path: Path, own: set[str]):
    """(line, top-level name) of each absolute import that is neither stdlib nor `own`."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.partition(".")[0]
            if top not in sys.stdlib_module_names and top not in own:
                yield node.lineno, top


def undeclared_imports(root: Path) -> list[str]:
    """One line per import, in the packages that root's pyproject.toml builds, of a
    distribution that pyproject.toml does not declare where that module needs it."""
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {})
    own = {pattern.rstrip("*") for pattern
           in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    everywhere = declared(project["dependencies"])
    for extra in ONE_OF_EXTRAS:
        everywhere |= declared(extras.get(extra, []))
    providers = packages_distributions()
    problems = []
    for package in sorted(own):
        for path in sorted((root / package).rglob("*.py")):
            module = path.relative_to(root).with_suffix("").parts
            module = module[:-1] if module[-1] == "__init__" else module
            extra = next((e for e, names in MODULES_OF_EXTRA.items() if module[-1] in names),
                         None)
            allowed = everywhere | declared(extras.get(extra, []) if extra else [])
            where = "[project] dependencies" + (f" or the `{extra}` extra" if extra else "")
            for line, name in third_party_imports(path, own):
                distributions = sorted({canonical(d) for d in providers.get(name, [])})
                if not distributions:
                    problems.append(f"{path.relative_to(root)}:{line}: imports {name}, "
                                    "which no installed distribution provides")
                elif not set(distributions) & allowed:
                    problems.append(f"{path.relative_to(root)}:{line}: imports {name} "
                                    f"(distribution {' or '.join(distributions)}), "
                                    f"not declared in {where}")
    return problems


def test_every_imported_package_is_declared_in_pyproject():
    problems = undeclared_imports(REPO)
    assert not problems, "\n".join(problems)


def test_an_undeclared_import_is_reported_with_its_file(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["PyYAML>=6"]\n'
        '[project.optional-dependencies]\nstack = ["psycopg2-binary"]\n'
        '[tool.setuptools.packages.find]\ninclude = ["app*"]\n')
    (tmp_path / "app" / "ops").mkdir(parents=True)
    (tmp_path / "app" / "__init__.py").write_text("import yaml\nfrom app import ops\n")
    (tmp_path / "app" / "ops" / "stack.py").write_text("import psycopg2\nimport json\n")
    (tmp_path / "app" / "ops" / "db.py").write_text(
        "from . import stack\n\ndef connect():\n    import psycopg2.extras\n")
    assert undeclared_imports(tmp_path) == [
        "app/ops/db.py:4: imports psycopg2 (distribution psycopg2-binary), "
        "not declared in [project] dependencies"]

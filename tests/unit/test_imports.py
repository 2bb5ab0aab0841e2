"""The import rules: config imports nothing from the package, layout and the model stay free of
torch.distributed and moefold.parallel, and importing the package neither touches CUDA nor has
side effects."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "moefold"


def _dotted(node: ast.expr) -> str | None:
    """`a.b.c` for a chain of attributes on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def used_modules(source: str, module: str) -> set[str]:
    """Absolute names a module imports or reaches: `import a.b`, `from a import b` (a and a.b),
    relative imports resolved against `module`, `importlib.import_module("a")`, and attribute
    chains such as `torch.distributed.all_reduce` (so `import torch` cannot hide them)."""
    package = module.split(".")[:-1]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = _dotted(node.func) or ""
            if function.split(".")[-1] in ("import_module", "__import__"):
                names.add(str(node.args[0].value))
        elif isinstance(node, ast.Attribute):
            names.add(_dotted(node) or "")
    names.discard("")
    return names


def violations(path: Path, banned: tuple[str, ...]) -> list[str]:
    relative = path.relative_to(REPO).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    module = ".".join(parts) + (".__init__" if relative.name == "__init__" else "")
    used = used_modules(path.read_text(), module)
    return sorted(n for n in used for b in banned if n == b or n.startswith(b + "."))


def test_checker_finds_every_import_form():
    source = (
        "import torch.distributed as dist\n"
        "from torch import distributed\n"
        "from ..parallel import mesh\n"
        "from . import router\n"
        "import torch\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('moefold.parallel.comm')\n"
        "    return torch.distributed.get_rank()\n"
    )
    used = used_modules(source, "moefold.model.moe")
    assert {
        "torch.distributed",
        "moefold.parallel",
        "moefold.parallel.mesh",
        "moefold.model.router",
        "moefold.parallel.comm",
        "torch.distributed.get_rank",
    } <= used
    assert "moefold.model.moe" in used_modules(
        "from .moe import MoELayer", "moefold.model.__init__"
    )


def test_config_imports_nothing_from_moefold():
    assert violations(PACKAGE / "config.py", ("moefold",)) == []


def test_layout_does_not_import_torch_distributed():
    assert violations(PACKAGE / "parallel" / "layout.py", ("torch.distributed",)) == []


def test_model_and_kernels_never_import_parallel_or_torch_distributed():
    files = sorted((PACKAGE / "model").rglob("*.py")) + sorted((PACKAGE / "kernels").rglob("*.py"))
    assert len(files) > 5, "moefold/model or moefold/kernels has no files"
    found = {
        str(path.relative_to(REPO)): bad
        for path in files
        if (bad := violations(path, ("moefold.parallel", "torch.distributed")))
    }
    assert found == {}


# ---- in a fresh interpreter ---------------------------------------------------------------------

CUDA_PROBE = """
import json, sys, torch
calls = []
def spy(name):
    original = getattr(torch.cuda, name)
    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)
    setattr(torch.cuda, name, wrapper)
for name in ("_lazy_init", "init", "is_available", "device_count", "current_device",
             "set_device", "synchronize", "get_device_properties", "manual_seed_all"):
    spy(name)
import moefold, moefold.model
print(json.dumps({
    "calls": calls,
    "initialized": torch.cuda.is_initialized(),
    "parallel": sorted(m for m in sys.modules if m.startswith("moefold.parallel")),
}))
"""


def test_importing_moefold_and_model_does_not_touch_cuda():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", CUDA_PROBE], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"calls": [], "initialized": False, "parallel": []}


SIDE_EFFECT_PROBE = """
import json, logging, os, sys, threading, warnings
before = (set(sys.modules), dict(os.environ), list(logging.root.handlers),
          threading.active_count(), list(warnings.filters), list(sys.path))
import moefold
after = (set(sys.modules), dict(os.environ), list(logging.root.handlers),
         threading.active_count(), list(warnings.filters), list(sys.path))
print(json.dumps({
    "new_modules": sorted(after[0] - before[0]),
    "unchanged": [a == b for a, b in zip(after[1:], before[1:])],
}))
"""


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if "__pycache__" not in p.parts}


def test_import_moefold_has_no_side_effects(tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    package_before = _files(PACKAGE)
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    result = subprocess.run(
        [sys.executable, "-c", SIDE_EFFECT_PROBE],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"import moefold printed: {lines[:-1]}"
    report = json.loads(lines[0])
    assert report == {"new_modules": ["moefold"], "unchanged": [True] * 5}
    assert list(cwd.iterdir()) == [] and list(home.iterdir()) == []
    assert _files(PACKAGE) == package_before


def test_docs_import_graph_is_the_code_s():
    """docs/architecture.md's import graph is scripts/import_graph.py's output, not a drawing."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts/import_graph.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    expected = script.render(script.import_graph())
    doc = (REPO / "docs" / "architecture.md").read_text()
    block = doc.split("## Import graph", 1)[1].split("```\n", 2)[1]
    assert block == expected, (
        "docs/architecture.md's import graph is stale: paste `python scripts/import_graph.py`"
    )

"""The shape of the code base: layers without cycles, files with one job, one
installed name. These read the source (every import, function-level and
type-only ones included) and the built wheel; they run nothing of eosrl."""
import ast
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

PACKAGES = {"agents": "eosrl.agents", "envs": "eosrl.envs", "launch": "eosrl.launch"}
# Layers: a package may import only those below it.
LAYERS = ["eosrl.envs", "eosrl.agents", "eosrl.launch"]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
# Modules allowed above MAX_MODULE_LINES, with the reason.
LONG_MODULES: dict = {}


def _modules():
    """{module name: path} of every source module, as installed (eosrl.agents.x, ...)."""
    found = {"eosrl": ROOT / "eosrl" / "__init__.py"}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


MODULES = _modules()


def _imports(name, path):
    """Every eosrl module `name` imports, wherever the import statement stands."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in MODULES and t != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name):
    for i, layer in enumerate(LAYERS):
        if name == layer or name.startswith(layer + "."):
            return i
    return -1  # the eosrl package itself


def test_no_module_uses_old_top_level_names():
    """Imports are `eosrl.agents...`: a stray `import agents` would load a second copy."""
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                assert node.module.split(".")[0] not in PACKAGES, f"{path}: from {node.module} import"
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in PACKAGES, f"{path}: import {alias.name}"


def test_layers_import_only_downwards():
    """envs imports nothing of agents or launch; agents nothing of launch."""
    upward = [(a, b) for a, deps in GRAPH.items() for b in deps if _layer(b) > _layer(a) >= 0]
    assert not upward, upward


def test_no_import_cycle():
    """Tarjan's strongly connected components over every import, function-level ones too."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            # A package importing its own submodules (re-exports) is not a cycle of jobs.
            if len(component) > 1 and not all(c.startswith(min(component, key=len)) for c in component):
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for name, path in MODULES.items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES and name not in LONG_MODULES:
            long_modules.append((name, lines))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append((name, node.name, length))
    assert not long_modules, long_modules
    assert not long_functions, long_functions


def test_wheel_installs_only_eosrl(tmp_path):
    """`pip install` puts one top-level name into site-packages, with every subpackage."""
    source = tmp_path / "source"  # a clean copy: an in-tree build/ could keep deleted files
    source.mkdir()
    for name in ["pyproject.toml", "README.md", "eosrl", *PACKAGES]:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "-q", "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("eosrl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"eosrl"}
    packaged = {n[: -len(".py")].replace("/", ".") for n in names if n.endswith(".py")}
    packaged = {m[: -len(".__init__")] if m.endswith(".__init__") else m for m in packaged}
    assert packaged == set(MODULES), set(MODULES) ^ packaged


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_what_it_is_for(name):
    """A file tells you what it is for in its first lines (CleanRL)."""
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text()))
    assert doc and len(doc.split()) >= 5, f"{MODULES[name]}: no module docstring"


def test_agents_config_holds_only_what_an_agent_is():
    """What a run is (run, distributed, regime, the whole Config, loading) lives in
    launch/config.py; agents/config.py keeps the agent's sections and their checks."""
    tree = ast.parse(MODULES["eosrl.agents.config"].read_text())
    defined = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
    run_side = {"Config", "RunConfig", "DistributedConfig", "RegimeConfig", "load_config", "from_dict",
                "save_config", "validate"}
    assert not defined & run_side, defined & run_side
    assert {"AgentConfig", "ReplayConfig", "ProbeConfig", "validate_agent"} <= defined


def test_reading_and_checking_a_config_imports_no_jax():
    """`load_config` (every check included) runs without JAX, TensorFlow or Reverb: a
    study plans, and the CLI refuses a bad config, before any of them loads."""
    code = ("import sys; from eosrl.launch.config import load_config; "
            "load_config(sys.argv[1], ['agent.spectral_norm.layers=-2']); "
            "print(sorted(m for m in ('jax', 'haiku', 'tensorflow', 'reverb') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "configs" / "dqn_cartpole.yaml")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"

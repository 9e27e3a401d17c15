"""The tree is the architecture (issue 21): packages by concern in layers that import only downward, no import
cycles, the TensorFlow-free packages proven free, and every documented or formerly public name still importable."""
import ast
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import dtf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "dtf")

# Lower layers never import higher ones; packages of one layer do not import each other. The commands
# (`dtf/*.py`: run, launch, tune, predict, bench, batch_study and their shared `cli`) are the top.
LAYERS = [{"base"}, {"config"}, {"cluster", "upstream"}, {"backends", "datasets", "optim"}, {"distribute"},
          {"experiment"}, {"tracking"}, {"inference", "tuning", "benchmarks"}]
COMMANDS = len(LAYERS)
TENSORFLOW_FREE = ["base", "config", "cluster", "backends"]
COMMAND_MODULES = ["dtf", "dtf.cli", "dtf.run", "dtf.launch", "dtf.tune", "dtf.predict", "dtf.bench", "dtf.batch_study"]

# Fails the moment TensorFlow or Keras is imported (as on a login node without them), and lists what tried.
NO_TENSORFLOW = ("import importlib, sys\n"
                 "tried = []\n"
                 "class NoTensorFlow:\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 "        if name.split('.')[0] in ('tensorflow', 'keras', 'keras_tuner'):\n"
                 "            tried.append(name)\n"
                 "            raise ImportError(f'no {name} here')\n"
                 "sys.meta_path.insert(0, NoTensorFlow())\n"
                 "for module in sys.argv[1:]:\n"
                 "    importlib.import_module(module)\n"
                 "print(sorted(set(tried)))\n")


def _modules():
    """{dotted name: file} of every module of the dtf package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


MODULES = _modules()


def _imports(path, module_level_only=False):
    """The dtf modules `path` imports (a `from dtf.pkg import name` counts as dtf.pkg.name when that is a module)."""
    tree = ast.parse(open(path).read())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dtf" and not node.level:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "dtf"}
    return found


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and os.path.isdir(os.path.join(PACKAGE, parts[1])):
        return next(i for i, packages in enumerate(LAYERS) if parts[1] in packages)
    return COMMANDS


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if _layer(module) < COMMANDS else "commands"


def test_every_package_has_a_layer():
    packages = {name for name in os.listdir(PACKAGE) if os.path.isfile(os.path.join(PACKAGE, name, "__init__.py"))}
    assert packages == set().union(*LAYERS)


def test_libraries_import_only_downward():
    upward = []
    for module, path in MODULES.items():
        for imported in _imports(path):
            if imported in MODULES and imported != "dtf" and _package(imported) != _package(module) and (
                    _layer(imported) >= _layer(module)):
                upward.append(f"{module} -> {imported}")
    assert not upward, "imports that run against the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {m: {i for i in _imports(p, module_level_only=True) if i in MODULES and i != m} for m, p in MODULES.items()}
    for package in {m for m in MODULES if m.count(".") == 1}:  # importing dtf.x.y imports the package dtf.x first
        graph.setdefault(package, set())
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for nxt in sorted(graph.get(module, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not [c for c in cycles if not c.startswith("dtf ")], "\n".join(cycles)


def test_the_import_check_sees_a_violation(tmp_path):
    """The scan is not vacuous: an upward import in a library is what it reports."""
    path = tmp_path / "bad.py"
    path.write_text("def f():\n    from dtf.experiment import train\n")
    assert "dtf.experiment.train" in _imports(str(path))
    assert _layer("dtf.experiment.train") > _layer("dtf.config.flags")


@pytest.mark.parametrize("package", TENSORFLOW_FREE)
def test_package_never_imports_tensorflow(package):
    modules = sorted(m for m in MODULES if m == f"dtf.{package}" or m.startswith(f"dtf.{package}."))
    assert len(modules) > 1
    proc = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, *modules], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_commands_start_without_tensorflow():
    proc = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, *COMMAND_MODULES], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_the_tensorflow_probe_sees_a_heavy_package():
    proc = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, "dtf.optim"], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode != 0 and "no tensorflow here" in proc.stderr


def _documented_names():
    """Every `dtf.a.b` name the Markdown docs, flagfiles and examples mention (not a file: MODEL_DIR/dtf.lock)."""
    names = set()
    for folder, _, files in os.walk(REPO):
        parts = os.path.relpath(folder, REPO).split(os.sep)
        if any(part.startswith(".") and part != "." or part in ("runs", "build") for part in parts):
            continue
        for name in files:
            if name.endswith((".md", ".flags")) or folder.endswith("examples"):
                text = open(os.path.join(folder, name), encoding="utf-8").read()
                names |= set(re.findall(r"(?<![\w/.-])dtf(?:\.[A-Za-z_]\w*)+", text))
    return sorted(names)


def _resolve(name: str):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            value = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            value = getattr(value, attr)
        return value
    raise ImportError(name)


@pytest.mark.parametrize("name", _documented_names())
def test_documented_name_imports(name):
    assert _resolve(name) is not None


@pytest.mark.parametrize("old, new", sorted(dtf._MOVED.items()))
def test_former_module_names_are_the_new_modules(old, new):
    module = importlib.import_module(f"dtf.{new}")
    assert importlib.import_module(f"dtf.{old}") is module and getattr(dtf, old) is module


@pytest.mark.parametrize("package, names", [
    ("cluster", ["ClusterInfo", "build_tf_config", "parse_tf_config"]), ("config", ["Config"]),
    ("inference", ["Predictions", "load_model", "predict"])])
def test_former_modules_now_packages_keep_their_api(package, names):
    """dtf.cluster, dtf.config and dtf.inference were modules; as packages they still give their public names."""
    module = importlib.import_module(f"dtf.{package}")
    assert all(callable(getattr(module, name)) for name in names)


def test_public_api():
    for name in dtf.__all__:
        assert getattr(dtf, name) is not None, name
    assert {m.name for m in pkgutil.iter_modules([PACKAGE])} >= {"run", "launch", "tune", "predict", "bench",
                                                                   "batch_study"}

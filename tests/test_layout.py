"""The architecture as tests: the direction of imports between layers (every import of every module, lazy
ones included, read with ``ast``), and the search and evaluation side working where torch cannot be
imported (subprocesses whose ``import torch`` fails)."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1] / "ctfreid"
TOP = {"codes", "encoded", "errors", "_atomic", "_rwlock", "__init__"}
# layer -> the layers its modules may import (docs/architecture.md)
ALLOWED = {
    "top": {"top"},
    "search": {"top", "search"},
    "eval": {"top", "search", "eval"},
    "data": {"top", "data"},
    "learn": {"top", "data", "learn"},
    "infer": {"top", "data", "learn", "search", "infer"},
    "serve": {"top", "data", "learn", "search", "eval", "infer", "serve"},
    "distributed": {"top", "search", "serve", "distributed"},
    "demo": {"top", "data", "learn", "search", "eval", "infer", "demo"},
    "cli": {"top", "data", "learn", "search", "eval", "infer", "serve", "distributed", "demo", "cli"},
}


def layer_of_module(name: str) -> str:
    """'ctfreid.search.index' -> 'search'; 'ctfreid.codes' -> 'top'; '__main__' belongs to the CLI."""
    parts = name.split(".")[1:]
    if not parts or parts[0] in TOP:
        return "top"
    if parts[0] == "__main__":
        return "cli"
    return parts[0]


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        yield name, path


def imports_of(path: Path) -> list[str]:
    """Every ctfreid module imported anywhere in the file (top level and inside functions)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use absolute ctfreid.* imports)"
            if node.module == "ctfreid":  # from ctfreid import x: x is a top-level module or a subpackage
                out += [f"ctfreid.{a.name}" for a in node.names]
            elif node.module:
                out.append(node.module)
    return out


def test_imports_point_one_way():
    bad = []
    for name, path in modules():
        layer = layer_of_module(name)
        assert layer in ALLOWED, f"{name}: unknown layer {layer!r} (add it to ALLOWED and docs/architecture.md)"
        for imp in imports_of(path):
            if imp.split(".")[0] != "ctfreid":
                continue
            target = layer_of_module(imp)
            if target not in ALLOWED[layer]:
                bad.append(f"{name} ({layer}) imports {imp} ({target})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_no_library_module_imports_the_cli_and_search_eval_never_import_torch():
    for name, path in modules():
        layer = layer_of_module(name)
        tops = {imp.split(".")[0] for imp in imports_of(path)}
        if layer in ("search", "eval", "top"):
            assert not tops & {"torch", "torchvision"}, f"{name} imports torch"
        if layer != "cli":
            assert not any(i == "ctfreid.cli" or i.startswith("ctfreid.cli.") for i in imports_of(path)), name
    for name, path in modules():  # inference reads the run directory, not the training loop
        if layer_of_module(name) == "infer":
            assert "ctfreid.learn.train" not in imports_of(path), name


NO_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None
sys.meta_path.insert(0, Block())
"""


def run_without_torch(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code, *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_search_and_eval_work_without_torch(tmp_path):
    code = """
import pkgutil, importlib, numpy as np
import ctfreid.search, ctfreid.eval
for pkg in (ctfreid.search, ctfreid.eval):
    for m in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{m.name}")
from ctfreid import CtFIndex, fit_thresholds, evaluate_ranking, pack_codes
rng = np.random.default_rng(0)
pids = np.repeat(np.arange(20), 4)
lat = rng.standard_normal((20, 64))[pids] + 0.3 * rng.standard_normal((80, 64))
codes = {L: pack_codes(lat @ rng.standard_normal((64, L)) > 0) for L in (32, 128)}
th = fit_thresholds(codes, pids, np.tile([0, 1], 40), beta=2.0)
index = CtFIndex(); index.add(codes); index.thresholds = th
D, I = index.rank({L: c[:5] for L, c in codes.items()})
m = evaluate_ranking(I, pids[:5], np.ones(5, int), pids, np.zeros(80, int))
assert "torch" not in sys.modules
print(int(I[0, 0]), round(float(m.rank1), 3))
"""
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "0"  # a query finds itself first


def test_evaluate_and_calibrate_commands_without_torch(tmp_path):
    from ctfreid.codes import pack_codes
    from ctfreid.encoded import EncodedSet, save_encoded

    rng = np.random.default_rng(1)
    centers = rng.standard_normal((30, 48))

    def encoded(pids, camids):
        lat = centers[pids] + 0.4 * rng.standard_normal((len(pids), 48))
        proj = np.random.default_rng(7)
        codes = {L: pack_codes(lat @ proj.standard_normal((48, L)) > 0) for L in (32, 64, 128)}
        return EncodedSet(codes=codes, pids=pids, camids=camids, features=lat.astype(np.float32))

    save_encoded(tmp_path / "val.npz", encoded(np.repeat(np.arange(10), 6), np.tile([0, 1, 2], 20)))
    save_encoded(tmp_path / "q.npz", encoded(np.arange(10, 30), np.zeros(20, int)))
    save_encoded(tmp_path / "g.npz", encoded(np.repeat(np.arange(10, 30), 3), np.ones(60, int)))
    code = "import sys; from ctfreid.cli import main; rc = main(sys.argv[1:]); assert 'torch' not in sys.modules; sys.exit(rc)"
    r = run_without_torch(code, "calibrate", "--val", str(tmp_path / "val.npz"), "--out", str(tmp_path / "th.json"))
    assert r.returncode == 0, r.stderr
    assert set(json.loads((tmp_path / "th.json").read_text())["thresholds"]) == {"32", "64"}
    r = run_without_torch(code, "evaluate", "--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "g.npz"),
                          "--thresholds", str(tmp_path / "th.json"), "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    methods = json.loads((tmp_path / "r.json").read_text())["methods"]
    assert {"float", "hash32", "hash128", "ctf"} <= set(methods)


def test_infer_does_not_load_the_training_loop():
    r = subprocess.run([sys.executable, "-c", "import sys, ctfreid.infer.encoder, ctfreid.infer.gallery, "
                        "ctfreid.learn.run_dir; print('ctfreid.learn.train' in sys.modules)"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_package_ships_py_typed():
    import tomllib

    assert (ROOT / "py.typed").is_file()
    conf = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    assert "py.typed" in conf["tool"]["setuptools"]["package-data"]["ctfreid"]


def test_every_public_top_level_name_resolves_without_torch():
    """``ctfreid.X`` for each X in ``__all__`` (the names of the flat layout before the subpackages) is the
    object of its home module; none of them needs torch."""
    code = """
import importlib, ctfreid
missing = [n for n in ctfreid.__all__ if getattr(ctfreid, n, None) is None]
assert not missing, missing
from ctfreid.errors import CtfreidError
assert ctfreid.CtfreidError is CtfreidError and issubclass(CtfreidError, ValueError)
for n in ctfreid.__all__:
    home = importlib.import_module(ctfreid._LAZY[n])
    assert getattr(ctfreid, n) is getattr(home, n), n
    assert n in dir(ctfreid)
for old in ("CtFIndex", "pack_codes", "unpack_codes", "fit_thresholds", "evaluate_ranking", "hamming_rank",
            "ctf_search", "load_encoded", "EncodedSet"):
    assert old in ctfreid.__all__, old
try:
    ctfreid.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("unknown names must raise AttributeError")
assert "torch" not in sys.modules
print(len(ctfreid.__all__))
"""
    r = run_without_torch(code)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) >= 17


def test_command_help_lines_are_the_modules_own():
    """``ctfreid --help`` lists ``_HELP`` without importing the commands: each line must equal its command
    module's ``HELP`` (read with ``ast``, so no optional dependency is needed)."""
    from ctfreid.cli import _HELP, COMMANDS

    assert set(_HELP) == set(COMMANDS)
    for name, module in COMMANDS.items():
        path = ROOT.parent / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        helps = [node.value for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "HELP" for t in node.targets)]
        assert len(helps) == 1, f"{path}: expected one top-level HELP = '...'"
        assert ast.literal_eval(helps[0]) == _HELP[name], f"_HELP[{name!r}] differs from {module}.HELP"


def test_report_tables_work_without_torch_and_matplotlib(tmp_path):
    """Tables and JSON of a report need neither torch nor matplotlib (only the plots need matplotlib)."""
    code = """
import importlib.abc
class NoPlots(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("matplotlib blocked by the test")
sys.meta_path.insert(0, NoPlots())
from ctfreid.eval import report
from ctfreid.eval.evaluate import format_table
res = {"methods": {"hash32": {"rank1": .5, "rank5": .6, "rank10": .7, "mAP": .4, "query_ms": 1.0},
                   "ctf": {"rank1": .6, "rank5": .7, "rank10": .8, "mAP": .5, "query_ms": 0.5}}}
j, m = report.write_tables(res, sys.argv[1])
print(format_table(res).splitlines()[-1])
assert "torch" not in sys.modules and "matplotlib" not in sys.modules
"""
    r = run_without_torch(code, str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "results.md").is_file() and "ctf" in (tmp_path / "results.md").read_text().lower()


def test_one_definition_of_each_shared_name():
    """Names that once had two definitions (the same constant in two modules, two table formatters...)
    are defined in exactly one module; everything else imports them."""
    once = {"DEFAULT_BETAS": "ctfreid.eval.evaluate", "IMAGE_EXTENSIONS": "ctfreid.data.datasets",
            "format_table": "ctfreid.eval.evaluate", "method_key": "ctfreid.eval.report",
            "parse_method": "ctfreid.eval.report", "squared_euclidean_distances": "ctfreid.eval.metrics",
            "CtfreidError": "ctfreid.errors", "atomic_write": "ctfreid._atomic"}
    where: dict[str, list[str]] = {name: [] for name in once}
    for name, path in modules():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign):
                defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                defined = [node.target.id]
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined = [node.name]
            else:
                continue
            for d in defined:
                if d in where:
                    where[d].append(name)
    assert where == {name: [home] for name, home in once.items()}

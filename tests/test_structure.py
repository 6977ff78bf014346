"""The package's shape: module sizes, one home per concern, and entry points that start without Keras.

The import checks run in fresh interpreters and look at ``sys.modules``, not at wall time: what a
parser imports decides how fast ``--help`` and argument errors are, whatever the machine.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import pytest

import keras_convmixer as kc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "keras_convmixer"
# A module past this has, so far each time, taken on a second concern (the old data.py held five at 872 lines).
MAX_MODULE_LINES = 400
# A function past this has, so far each time, been doing several things (the old _train_locked did ten in 110).
MAX_FUNCTION_LINES = 60
# Left over the limits on purpose, each with its reason.
OVER_THE_LIMIT = {
    # One tf.function per signature, each closing over the model part: split, they would pass it around.
    "keras_convmixer/savedmodel.py:_write_saved_model": "the three serving signatures built side by side",
    # Evaluation is reworked with the front-door work.
    "keras_convmixer/evaluation.py:evaluate": "until that rework",
    # The two loaders walk every source kind in one place; split with the streamed multi-process input.
    "keras_convmixer/data/sources.py:load_source": "one branch per source kind",
    "keras_convmixer/data/in_memory.py:load_in_memory": "decode, cache and split in one pass",
}
HEAVY = ("keras", "tensorflow", "jax", "torch")
CONSOLE_SCRIPTS = {
    "convmixer-train": "keras_convmixer.cli.train:main",
    "convmixer-evaluate": "keras_convmixer.cli.evaluate:main",
    "convmixer-predict": "keras_convmixer.cli.predict:main",
    "convmixer-export": "keras_convmixer.cli.export:main",
    "convmixer-convert": "keras_convmixer.cli.convert:main",
}

# Imports a module (import:name), or runs a script (path.py) or an entry point (module:function) with the
# given arguments, then prints which of the heavy frameworks it imported and how it exited, after a marker line.
_PROBE = r"""
import importlib, json, runpy, sys
target, argv = sys.argv[1], sys.argv[2:]
code = 0
try:
    if target.startswith("import:"):
        importlib.import_module(target[len("import:"):])
    elif target.endswith(".py"):
        sys.argv = [target, *argv]
        runpy.run_path(target, run_name="__main__")
    else:
        module, function = target.split(":")
        sys.argv = [module, *argv]
        code = getattr(importlib.import_module(module), function)(argv)
except SystemExit as exit:
    code = exit.code
loaded = sorted({name.split(".")[0] for name in sys.modules} & {HEAVY})
print("\n@@probe " + json.dumps({"code": code, "loaded": loaded}))
""".replace("{HEAVY}", repr(set(HEAVY)))


def _probe(target, *argv, backend="tensorflow"):
    """(exit code, heavy modules imported, output) of ``target`` run in a fresh interpreter."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, target, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    marker = [line for line in result.stdout.splitlines() if line.startswith("@@probe ")]
    assert marker, f"{target} {' '.join(argv)} did not finish:\n{result.stderr[-2000:]}"
    report = json.loads(marker[-1][len("@@probe ") :])
    return report["code"], report["loaded"], result.stdout + result.stderr


# --------------------------------------------------------------------------- the import graph

# Each module's layer, bottom first: a module may import from its own layer and the ones below it,
# never from above. A new module must be placed here, which is the point: its place is a decision.
LAYERS = (
    # Keras-free vocabulary and single-rule helpers: what everything else may name.
    (
        "keras_convmixer",
        "errors",
        "jsontext",
        "progress",
        "imagenet",
        "vocabulary",
        "structure",
        "tf_import",
        "presets",
        "model_docs",
        "atomic",
    ),
    # Primitives: the custom op, initialisers, schedules, image decoding, the settings table, the run directory.
    (
        "ops",
        "ops.tuning",
        "ops.depthwise",
        "ops.depthwise_pallas",
        "ops.depthwise_xla",
        "initializers",
        "schedules",
        "data.transforms",
        "settings",
        "cache",
        "rundir",
        "distribute",
    ),
    # Layers, data, augmentation, what fit reads, checkpoint reading and the recipes.
    (
        "layers",
        "data",
        "data.folders",
        "data.sources",
        "data.in_memory",
        "data.tf_pipeline",
        "data.decoding",
        "data.stream",
        "augment",
        "augment.xp",
        "augment.image_ops",
        "augment.policies",
        "augment.crop",
        "augment.erasing",
        "augment.mix",
        "augment.randaugment",
        "augment.pipelines",
        "hub",
        "convert",
        "curves",
        "recipes",
        "optim",
        "inputs",
    ),
    # Where weights come from: it maps tensors and never builds a model.
    ("pretrained",),
    # The one builder.
    ("models",),
    # What is built on a model: conversion to a folder, fine-tuning, saved artefacts, the typed config.
    ("conversion", "finetune", "artifacts", "config", "callbacks"),
    ("resume", "report", "evaluation", "prediction", "savedmodel", "export"),
    ("training",),
    ("cli", "cli.common", "cli.train", "cli.evaluate", "cli.predict", "cli.export", "cli.convert"),
)


def _module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path, modules):
    """The package modules ``path`` imports anywhere (function bodies included), as dotted names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports pkg.mod; ``from mod import name`` imports mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _import_graph():
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imported_modules(path, paths) for name, path in paths.items()}


def test_no_module_is_over_the_size_limit():
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    offenders = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES and path not in OVER_THE_LIMIT}
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines: " + ", ".join(
        f"{path} ({n})" for path, n in sorted(offenders.items(), key=lambda item: -item[1])
    )


@pytest.mark.parametrize("module", ["keras_convmixer", "keras_convmixer.presets", "keras_convmixer.recipes"])
def test_light_modules_import_no_framework(module):
    code, loaded, output = _probe(f"import:{module}")
    assert code == 0, output[-2000:]
    assert loaded == [], f"import {module} imported {loaded}"


def test_public_api_resolves_every_name():
    assert set(kc.__all__) <= set(dir(kc))
    for name in kc.__all__:
        assert getattr(kc, name) is not None, name
    assert callable(kc.load_model) and kc.MODEL_CONFIGS is kc.presets.MODEL_CONFIGS
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        kc.not_a_name  # noqa: B018


def test_train_script_help_imports_no_framework():
    code, loaded, output = _probe("scripts/train.py", "--help")
    assert code == 0, output[-2000:]
    assert "usage:" in output
    assert loaded == [], f"scripts/train.py --help imported {loaded}"


@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_console_script_help_imports_no_framework(script):
    code, loaded, output = _probe(CONSOLE_SCRIPTS[script], "--help")
    assert code == 0, output[-2000:]
    assert "usage:" in output
    assert loaded == [], f"{script} --help imported {loaded}"


def test_console_scripts_are_declared():
    setup = (ROOT / "setup.cfg").read_text(encoding="utf-8")
    for script, target in CONSOLE_SCRIPTS.items():
        assert f"{script} = {target}" in setup


@pytest.mark.parametrize("script", sorted(CONSOLE_SCRIPTS))
def test_installed_console_script_runs_help(script):
    path = pathlib.Path(sys.executable).parent / script
    assert path.is_file(), f"{path} is not installed: run `pip install -e .` (or `make install`)"
    result = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout


def _cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for dep in sorted(graph[node]):
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in on_stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    # The graph checks below pass on an empty answer: show that the finder can give a non-empty one.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_scan_sees_function_level_imports(tmp_path):
    module = PACKAGE / "models.py"
    found = _imported_modules(module, {_module_name(p) for p in PACKAGE.rglob("*.py")})
    assert "keras_convmixer.layers" in found


def test_no_import_cycle():
    assert _cycles(_import_graph()) == []


def test_every_module_has_a_layer_and_imports_only_downwards():
    rank = {
        ("keras_convmixer." + name if name != "keras_convmixer" else name): i
        for i, row in enumerate(LAYERS)
        for name in row
    }
    graph = _import_graph()
    unplaced = sorted(set(graph) - set(rank))
    assert not unplaced, f"modules with no place in LAYERS: {unplaced}"
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if rank[d] > rank[m])
    assert not upward, "imports from a layer above: " + ", ".join(upward)


def test_no_function_is_over_the_size_limit():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where = f"{path.relative_to(ROOT)}:{node.name}"
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and where not in OVER_THE_LIMIT:
                    offenders.append(f"{where} ({lines})")
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines: " + ", ".join(offenders)

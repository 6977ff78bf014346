"""The package's shape: module sizes, one home per concern, and entry points that start without Keras.

The import checks run in fresh interpreters and look at ``sys.modules``, not at wall time: what a
parser imports decides how fast ``--help`` and argument errors are, whatever the machine.
"""

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
MAX_MODULE_LINES = 500
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


def test_no_module_is_over_the_size_limit():
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text(encoding="utf-8").splitlines())
        for path in sorted(PACKAGE.rglob("*.py"))
    }
    offenders = {path: n for path, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines: " + ", ".join(
        f"{path} ({n})" for path, n in sorted(offenders.items(), key=lambda item: -item[1])
    )


def test_one_home_per_concern():
    # The old single-file homes must be gone once their packages exist: two homes for one concern
    # (or a shim re-exporting the new one) are what the layout rules out.
    packages = ("data", "augment", "cli", "ops")
    missing = [name for name in packages if not (PACKAGE / name / "__init__.py").is_file()]
    assert not missing, f"missing packages: {missing}"
    modules = (
        "presets",
        "schedules",
        "recipes",
        "distribute",
        "callbacks",
        "rundir",
        "training",
        "artifacts",
        "evaluation",
        "prediction",
        "export",
        "convert",
        "models",
        "layers",
        "initializers",
    )
    missing = [name for name in modules if not (PACKAGE / f"{name}.py").is_file()]
    assert not missing, f"missing modules: {missing}"
    stale = ("data.py", "augment.py", "cli.py", "inference.py", "benchmark.py", "erasing.py", "randaugment.py")
    lingering = [name for name in stale if (PACKAGE / name).exists()]
    assert not lingering, f"old modules still in keras_convmixer/: {lingering}"


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

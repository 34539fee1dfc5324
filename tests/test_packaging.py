"""The package as a user installs it: a wheel (not this checkout) in a fresh virtual environment, with only the core
dependencies importable, runs a recipe from another directory through the export, and the export loads with plain
`from_pretrained` in a fresh process.

Real pip, a real venv and real processes throughout. Offline: the wheel is built without build isolation (setuptools
comes from this environment) and installed without dependencies; the venv sees this environment's packages
(`--system-site-packages`), torch and transformers among them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import yaml

from hf_modelopt.extras import EXTRAS

from .conftest import REPO, tiny_recipe, write_small_data

# The optional packages are made unimportable in the venv (sitecustomize runs at every interpreter start, so in the
# processes hf-modelopt starts too): the run must need nothing but the core dependencies.
HIDE_OPTIONAL = """\
# Written by tests/test_packaging.py: the optional packages look uninstalled, as after `pip install hf-modelopt`.
import sys

sys.modules.update(dict.fromkeys({modules!r}))
"""


def _clean_env(tmp_path) -> dict[str, str]:
    # The tests run with PYTHONPATH naming the checkout (and the user site could hold anything): without this the
    # venv's interpreter would import the checkout, not the wheel.
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "HF_MODELOPT_DATA_DIR")}
    return {**env, "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1"}


def _run(command, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def build_wheel(tmp_path, env) -> Path:
    # From a copy: pip builds in the source folder, and build/ and *.egg-info must not appear in the checkout (or
    # race between test workers).
    source = tmp_path / "source"
    shutil.copytree(REPO / "hf_modelopt", source / "hf_modelopt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", tmp_path / "dist", source], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("hf_modelopt-*.whl")
    return wheel


def test_wheel_in_a_fresh_venv_runs_a_recipe_from_another_directory(tiny_models, tmp_path):
    env = _clean_env(tmp_path)
    wheel = build_wheel(tmp_path, env)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "hf_modelopt/export/templates/default.md" in names  # the card template is package data
    core = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not [line for line in core for extra in EXTRAS.values() for name in extra.values()
                if line.split()[1].lower().startswith(name.lower())], core

    home = tmp_path / "venv"
    venv.create(home, system_site_packages=True, with_pip=False, symlinks=True)
    python = home / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--force-reinstall",
          "--disable-pip-version-check", "-q", wheel], cwd=tmp_path, env=env)
    site_packages = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                         env).stdout.strip()
    modules = [module for packages in EXTRAS.values() for module in packages]
    assert site_packages.startswith(str(home) + "/"), site_packages
    (Path(site_packages) / "sitecustomize.py").write_text(HIDE_OPTIONAL.format(modules=modules))

    # A user's project: a recipe and its data side by side, run from another directory. The recipe names no
    # data_dir: it is the recipe's folder. The tiny model (built by the fixtures) is named by its absolute path.
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    write_small_data(project)
    recipe = tiny_recipe(tiny_models("bert"), project, stages=[
        "finetune", {"type": "export", "compare_base": False, "latency_repeats": 0}])
    del recipe["data"]["data_dir"]
    recipe["training"]["max_steps"] = 2
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    elsewhere.mkdir()

    # The installed package is the wheel's: the venv's site-packages come before the system's on sys.path, so the
    # setuptools editable finder of a development install (appended to sys.meta_path) is never asked.
    code = "import importlib.util, hf_modelopt; print(hf_modelopt.__file__, importlib.util.find_spec('bitsandbytes'))"
    where, bitsandbytes = _run([python, "-c", code], elsewhere, env).stdout.split()
    assert where.startswith(site_packages + "/") and bitsandbytes == "None", where
    run = _run([home / "bin" / "hf-modelopt", "run", "../project/recipe.yaml", "--output-dir", "out"], elsewhere, env)
    assert "Done." in run.stdout, run.stdout[-2000:]
    assert "loss curves left out of the card: drawing them needs matplotlib (pip install 'hf-modelopt[plots]')" \
        in run.stderr
    out = elsewhere / "out"
    record = json.loads((out / "export.json").read_text())
    assert record["reload_check"]["passed"] and "accuracy" in record["metrics"]
    assert "from_pretrained" in (out / "README.md").read_text()  # the card, rendered from the packaged template

    # The export in a fresh process, by plain transformers: hf_modelopt is never imported.
    code = ("import sys; from transformers import AutoModelForSequenceClassification as M, AutoTokenizer as T; "
            "m = M.from_pretrained('out'); t = T.from_pretrained('out'); "
            "print(m(**t(['a fine film'], return_tensors='pt')).logits.shape[-1], 'hf_modelopt' in sys.modules)")
    assert _run([python, "-c", code], elsewhere, env).stdout.split() == ["2", "False"]

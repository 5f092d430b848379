"""The config edge: JSON Schema for editors, --dry-run, and the module structure it rests on."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from esdbs_ray.cli import main
from esdbs_ray.config import PipelineConfig, build_config, json_schema
from esdbs_ray.presets import PRESETS

PKG = Path(__file__).resolve().parents[1] / "esdbs_ray"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_validates_against_the_published_schema(preset):
    """`esdbs config --schema` is what an editor checks YAML against: every preset must pass it, and a
    bad value must fail it the way the config does."""
    import jsonschema

    schema = json_schema()
    jsonschema.validate(build_config(preset).to_dict(), schema)
    bad = build_config(preset).to_dict()
    bad["train"]["width"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_config_schema_and_resolved_config_on_the_command_line(capsys):
    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"train", "members", "variants", "stack", "resources"} <= set(schema["properties"])
    assert main(["config", "--preset", "quick", "--set", "train.width=0.5"]) == 0
    d = yaml.safe_load(capsys.readouterr().out)
    assert d["train"]["width"] == 0.5 and PipelineConfig.from_dict(d) == build_config("quick", sets=["train.width=0.5"])


def test_dry_run_prints_config_and_trial_table_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--preset", "paper-fashion-mnist-cpu", "--dry-run", "--out", "exp"]) == 0
    out = capsys.readouterr().out
    cfg = build_config("paper-fashion-mnist-cpu")
    assert f"# {len(cfg.trials())} trial(s) -> exp" in out
    for t in cfg.trials():
        assert t.member in out
    epochs = sum(t.train.total_epochs for t in cfg.trials())
    assert f"# cost: {epochs} trial-epochs, {epochs * 9000 * 0.9:,.0f} training images" in out
    assert list(tmp_path.iterdir()) == []
    # --calibrate: one timed step per member here, a wall-time estimate
    assert main(["run", "--preset", "smoke", "--dry-run", "--calibrate", "--out", "exp"]) == 0
    assert re.search(r"about \d+ min of training on these \d+ cores", capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []


def test_no_module_of_the_package_imports_one_that_imports_it_back():
    graph = {}
    for p in PKG.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("esdbs_ray."):
                deps.add(node.module.split(".")[1])
        graph[p.stem] = {d for d in deps if d != p.stem and (PKG / f"{d}.py").exists()}

    def reaches(a, b, seen=()):
        return any(d == b or (d not in seen and reaches(d, b, (*seen, d))) for d in graph.get(a, ()))

    cycles = sorted((a, b) for a in graph for b in graph[a] if reaches(b, a))
    assert not cycles, f"import circles: {cycles}"


def test_pipeline_module_holds_only_the_stages():
    assert len((PKG / "pipeline.py").read_text().splitlines()) < 350


def test_the_cli_starts_without_torch_or_ray():
    code = "import sys, esdbs_ray.cli; print([m for m in ('torch', 'ray') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


# The package's layers.  Ray is imported only by the Tune adapters and the pipeline that drives them;
# the trainer only by its Tune adapter and the CLI's train-one; the pipeline only by the CLI.  Every other
# module -- the maths, the records, the readers, inference, the report -- runs without them.
TUNE_ADAPTERS = {"trainable", "ray_env", "stacking_tune", "tune_analysis", "tracking", "submit", "progress",
                 "expansion_search"}
CLI = {"cli", "cli_train", "cli_results", "cli_common"}
MAY_IMPORT = {"ray": TUNE_ADAPTERS | {"pipeline"}, "train": {"trainable"} | CLI, "pipeline": CLI}


def _imports(path: Path) -> set[str]:
    """Every module an ``esdbs_ray`` file imports anywhere (functions too): 'ray', or a package module's name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "ray"}
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("esdbs_ray.")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and mod.split(".")[0] == "ray":
                found.add("ray")
            elif node.level == 0 and mod.startswith("esdbs_ray."):
                found.add(mod.split(".")[1])
            elif node.level == 1 and path.parent == PKG:
                found |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
            elif node.level == 2:  # from ..x in esdbs_ray/analysis
                found |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
    return found


def test_imports_point_down_the_layers():
    files = sorted([*PKG.glob("*.py"), *PKG.glob("analysis/*.py")])
    bad = sorted((f"{p.relative_to(PKG)} imports {dep}") for p in files for dep in _imports(p) & set(MAY_IMPORT)
                 if p.stem not in MAY_IMPORT[dep] or p.parent != PKG)
    assert not bad, bad
    # and nothing below the adapters pulls them in when it is imported
    below = [f"esdbs_ray.{p.stem}" for p in PKG.glob("*.py")
             if p.stem not in TUNE_ADAPTERS | CLI | {"pipeline", "train", "__init__"}]
    code = (f"import sys, importlib\nfor m in {below!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m == 'ray' or m in ('esdbs_ray.train', 'esdbs_ray.pipeline')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stdout + r.stderr


def test_no_issue_numbers_in_the_package():
    hits = [f"{p.relative_to(PKG)}:{i}" for p in PKG.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "issue #" in line.lower()]
    assert not hits, hits


def test_no_function_takes_more_than_eight_positional_parameters():
    many = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            # a Triton kernel's parameters are its launch signature (pointers, strides, block sizes)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not any(
                    ast.unparse(d).startswith("triton.jit") for d in node.decorator_list):
                positional = [a for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 8:
                    many.append(f"{p.relative_to(PKG)}:{node.lineno} {node.name} ({len(positional)})")
    assert not many, many

"""The CI examples: the workflow names real recipes and runs `yitrt run --json`; the shell script runs recipes,
collects their summaries and deployments, and exits non-zero when one fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from yitrt.recipe import builtin_recipes

pytestmark = pytest.mark.integration
CI = REPO_ROOT / "examples" / "ci"


def test_workflow_builds_existing_recipes_in_the_trtllm_container_with_run_json():
    workflow = yaml.safe_load((CI / "build-engines.yml").read_text())
    build = workflow["jobs"]["build"]
    recipes = [row["recipe"] for row in build["strategy"]["matrix"]["include"]]
    assert recipes and set(recipes) <= set(builtin_recipes())
    assert "trtllm-python-py3" in build["container"]["image"] and "self-hosted" in build["runs-on"]
    steps = "\n".join(str(step.get("run", "")) for step in build["steps"])
    assert "yitrt run recipes/${{ matrix.recipe }}.yaml" in steps and "--json" in steps
    assert "yitrt recipe validate recipes/*.yaml" in str(workflow["jobs"]["validate"]["steps"])


def test_shell_script_runs_recipes_and_reports_failures(demo_build, tmp_path):
    model = demo_build[0].path
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmodel: {demo: true}\ntarget: {gpu: L4, engin: reference}\n")
    env = {**os.environ, "WORK_ROOT": str(tmp_path / "work"), "OUT": str(tmp_path / "out"),
           "YITRT": str(Path(sys.executable).parent / "yitrt"),
           "YITRT_RUN_ARGS": f"--until fetch --set model.demo=false --set model.path={model}"}
    result = subprocess.run(["bash", str(CI / "build-engines.sh"), "recipes/demo.yaml", str(bad)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 3, result.stderr  # the bad recipe's exit status (validation)
    summary = json.loads((tmp_path / "out" / "demo.run.json").read_text())
    assert summary["ok"] and summary["did_work"] == ["fetch"]
    assert (tmp_path / "out" / "demo" / "recipe.resolved.yaml").is_file()
    assert "demo: ok; did fetch" in result.stdout
    assert "bad: FAILED: target.engin: unknown key (did you mean engine?)" in result.stdout

"""The CI build matrix used for real: examples/ci/qwen35c-build-matrix.yml turns `qwen35c matrix
--format github` into one build + verify job per target. Checked here by two linters that run on a
CPU (check-jsonschema's bundled GitHub-workflow schema; zizmor, offline, for injection and pinning),
and against the commands `matrix` prints: every one must parse with this CLI."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from qwen35c.cli import main
from qwen35c.targets import TARGETS

WORKFLOW = Path(__file__).resolve().parents[1] / "examples" / "ci" / "qwen35c-build-matrix.yml"


def _tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(path).exists():
        pytest.fail(f"{name} is a test dependency (pip install -e '.[test]'); it is not installed")
    return path


def test_the_workflow_passes_the_github_workflow_schema():
    result = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_workflow_has_no_zizmor_findings():
    result = subprocess.run([_tool("zizmor"), "--offline", "--no-progress", str(WORKFLOW)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_job_runs_the_commands_matrix_prints():
    flow = yaml.safe_load(WORKFLOW.read_text())
    matrix_job, build_job = flow["jobs"]["matrix"], flow["jobs"]["build"]
    assert any("qwen35c matrix --format github" in s.get("run", "") and ">> \"$GITHUB_OUTPUT\"" in s["run"]
               for s in matrix_job["steps"])
    assert build_job["strategy"]["matrix"] == "${{ fromJSON(needs.matrix.outputs.matrix) }}"
    assert build_job["runs-on"] == "${{ matrix.runner }}" and build_job["strategy"]["fail-fast"] is False
    steps = {s.get("name"): s for s in build_job["steps"]}
    assert steps["Build"]["env"]["BUILD"] == "${{ matrix.build }}" and steps["Build"]["run"] == 'eval "$BUILD"'
    verify = steps["Verify"]
    assert verify["env"]["VERIFY"] == "${{ matrix.verify }}" and "set -o pipefail" in verify["run"]
    assert "continue-on-error" not in verify          # a verify exit code other than 0 fails the job
    assert steps["Upload the artifact and its verify report"]["if"] == "always()"

    result = CliRunner().invoke(main, ["matrix", "--format", "github", "--model", "./model"])
    assert result.exit_code == 0 and result.output.startswith("matrix=")
    jobs = json.loads(result.output[len("matrix="):])["include"]
    assert [j["target"] for j in jobs] == list(TARGETS)
    for job in jobs:
        for key in ("build", "verify"):
            words = shlex.split(job[key])
            assert words[0] == "qwen35c"
            group = main.make_context("qwen35c", words[1:2])
            command = main.get_command(group, words[1])
            assert command is not None, words
            command.make_context(words[1], words[2:])                 # its options parse with this CLI
        assert job["build"].endswith(f"-o artifacts/{job['target']}")
        assert f"artifacts/{job['target']}" in job["verify"] and "--json" in job["verify"]

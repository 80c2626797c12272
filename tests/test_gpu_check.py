"""benchmarks/gpu_check.sh, the one-command GPU check, on a machine without a GPU: its
--dry-run parses, keeps to the 8 result files and finishes; every stage runs under `timeout`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
RESULT_FILES = {
    "summary.txt",
    "build.log",
    "tests.log",
    "correctness.json",
    "bench.json",
    "profile.txt",
    "sanitizer.log",
    "results.tgz",
}
# A command line that runs a program that could hang: every Python run goes through "$py",
# the CUDA tools through "$<tool>_bin".
INVOKES = re.compile(r'"\$py"|"\$\w+_bin"|(^|[;&|(]\s*)(nvidia-smi|git)\b')


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout"
)
def test_dry_run_leaves_exactly_the_eight_result_files(tmp_path):
    out = tmp_path / "gpu-results"
    out.mkdir()
    (out / "stale.json").write_text("{}")  # a previous run's leftover is removed
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p.name for p in out.iterdir()} == RESULT_FILES
    assert "dry run" in (out / "summary.txt").read_text().lower()
    correctness = json.loads((out / "correctness.json").read_text())
    assert "cases" in correctness and correctness["dry_run"] is True
    bench = json.loads((out / "bench.json").read_text())
    assert "rows" in bench and "headline" in bench
    for name in ("build.log", "tests.log", "profile.txt", "sanitizer.log"):
        assert (out / name).read_text().strip(), name
    with tarfile.open(out / "results.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("stages.tsv") for n in names), names


def logical_lines(text: str) -> list[str]:
    """The script's command lines: continuations joined, comments and heredoc bodies dropped."""
    lines, pending, heredoc_end = [], "", None
    for raw in text.splitlines():
        if heredoc_end is not None:
            if raw.strip() == heredoc_end:
                heredoc_end = None
            continue
        line = raw.split(" #", 1)[0] if not raw.lstrip().startswith("#") else ""
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line, pending = pending + line, ""
        match = re.search(r"<<-?'?(\w+)'?", line)
        if match:
            heredoc_end = match.group(1)
        if line.strip():
            lines.append(line)
    return lines


def test_every_stage_command_runs_under_timeout():
    text = SCRIPT.read_text()
    commands = [line for line in logical_lines(text) if _runs_a_program(line)]
    assert len(commands) >= 12, commands  # build, tests, 4 scripts, sanitizer, suites, probes...
    for line in commands:
        assert re.search(r"\btimeout\b", line), f"not under timeout: {line.strip()}"
    pytest_lines = [line for line in commands if "-m pytest" in line]
    assert pytest_lines and all("-m cuda" in line and "pytest_timeout" in line for line in pytest_lines)
    assert "--timeout=" in text  # pytest-timeout's per-test limit
    for script in ("gpu_correctness", "gpu_bench", "gpu_profile", "gpu_sanitizer"):
        assert f"benchmarks.{script}" in text, script


def _runs_a_program(line: str) -> bool:
    """Whether the line runs a program that could hang; `[ -n "$x_bin" ]` tests and
    `py="${PYTHON:-python3}"`-like assignments only name one."""
    if re.fullmatch(r"\s*(local\s+)?\w+=(\"[^\"]*\"|'[^']*'|\S*)\s*", line):
        return False
    return INVOKES.search(re.sub(r"\[\s[^]]*\s\]", "", line)) is not None

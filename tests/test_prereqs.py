"""scripts/prereqs.sh, what `make serve` and `make test` check first, on machines made up of
stand-in programs: which Python it takes, and the one line it prints for each missing piece."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "prereqs.sh"
BASH = shutil.which("bash")

PYTHON = """#!/bin/sh
# A stand-in Python {version}: prints its version, has venv, "creates" environments.
case "$2" in
  *version_info*) echo {version} ;;
esac
exit 0
"""
BROKEN = "#!/bin/sh\necho 'pyenv: {name}: command not found' >&2\nexit 127\n"
JAVA = "#!/bin/sh\necho 'openjdk version \"{version}\" 2025-04-15' >&2\n"


def machine(tmp_path: Path, programs: dict[str, str]) -> Path:
    """A folder of stand-in programs plus the few real tools the script uses, to be the whole PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("df", "dirname"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    for name, text in programs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def check(bin_dir: Path, venv: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(SCRIPT), str(venv)], env={"PATH": str(bin_dir), **env}, capture_output=True, text=True, timeout=60
    )


def test_with_only_python_3_12_it_takes_3_12(tmp_path):
    bin_dir = machine(tmp_path, {"python3.12": PYTHON.format(version="3.12"), "java": JAVA.format(version="17.0.15")})
    result = check(bin_dir, tmp_path / ".venv")
    assert result.returncode == 0, result.stderr
    assert f"creating {tmp_path / '.venv'} with python3.12 (Python 3.12)" in result.stdout


def test_a_shim_for_a_python_that_is_not_there_is_skipped(tmp_path):
    bin_dir = machine(
        tmp_path,
        {
            "python3.11": BROKEN.format(name="python3.11"),
            "python3.12": PYTHON.format(version="3.12"),
            "python3": PYTHON.format(version="3.13"),
            "java": JAVA.format(version="21.0.2"),
        },
    )
    result = check(bin_dir, tmp_path / ".venv")
    assert result.returncode == 0 and "with python3.12 (Python 3.12)" in result.stdout


def test_python_3_11_comes_first(tmp_path):
    bin_dir = machine(
        tmp_path,
        {
            "python3.11": PYTHON.format(version="3.11"),
            "python3.12": PYTHON.format(version="3.12"),
            "java": JAVA.format(version="17.0.1"),
        },
    )
    assert "with python3.11 (Python 3.11)" in check(bin_dir, tmp_path / ".venv").stdout


def test_python_overrides_the_search_and_must_be_supported(tmp_path):
    bin_dir = machine(
        tmp_path,
        {
            "python3.11": PYTHON.format(version="3.11"),
            "python3.10": PYTHON.format(version="3.10"),
            "java": JAVA.format(version="17.0.1"),
        },
    )
    result = check(bin_dir, tmp_path / ".venv", PYTHON="python3.10")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "missing: PYTHON=python3.10 is Python 3.10: this project supports Python 3.11 and 3.12 "
        "(torch 2.14.1 and TorchServe 0.12.0 are tested on them)"
    ]


def test_each_missing_piece_is_one_line_saying_what_to_install(tmp_path):
    bin_dir = machine(tmp_path, {"python3": PYTHON.format(version="3.9")})
    result = check(bin_dir, tmp_path / ".venv")
    lines = result.stderr.splitlines()
    assert result.returncode == 1 and len(lines) == 2 and not (tmp_path / ".venv").exists()
    assert lines[0].startswith("missing: Python 3.11 or 3.12 not found") and "apt-get install python3.12" in lines[0]
    assert lines[1].startswith("missing: Java not found") and "openjdk-17" in lines[1]


@pytest.mark.parametrize(("version", "shown"), [("11.0.22", "Java 11 found"), ("1.8.0_392", "Java 8 found")])
def test_java_older_than_17_is_named(tmp_path, version, shown):
    bin_dir = machine(tmp_path, {"python3.11": PYTHON.format(version="3.11"), "java": JAVA.format(version=version)})
    result = check(bin_dir, tmp_path / ".venv")
    assert result.returncode == 1 and result.stderr.startswith(
        f"missing: {shown}: TorchServe's frontend needs Java 17 or newer"
    )


def test_too_little_disk_for_a_new_environment_is_named(tmp_path):
    bin_dir = machine(tmp_path, {"python3.11": PYTHON.format(version="3.11"), "java": JAVA.format(version="17.0.1")})
    result = check(bin_dir, tmp_path / "new" / ".venv", MIN_FREE_GB="100000000")
    assert result.returncode == 1 and f"GB free in {tmp_path}: installing needs about 100000000 GB" in result.stderr


def test_an_existing_environment_is_checked_not_rebuilt(tmp_path):
    """No Python search or disk check once .venv exists; one made with another Python is named."""
    bin_dir = machine(tmp_path, {"java": JAVA.format(version="17.0.1")})
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(PYTHON.format(version="3.11"))
    (venv / "bin" / "python").chmod(0o755)
    ok = check(bin_dir, venv, MIN_FREE_GB="100000000")
    assert ok.returncode == 0 and ok.stdout == "" and ok.stderr == ""
    (venv / "bin" / "python").write_text(PYTHON.format(version="3.10"))
    stale = check(bin_dir, venv)
    assert stale.returncode == 1 and f"{venv} was made with Python 3.10: remove it ('rm -rf {venv}')" in stale.stderr


def test_the_makefile_checks_before_it_installs():
    """`make serve` and `make test` reach the environment through the check, never around it."""
    dry_run = subprocess.run(
        ["make", "-n", "-B", "test", "serve"], cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHON="")
    )
    lines = dry_run.stdout.splitlines()
    first_install = next(i for i, line in enumerate(lines) if "pip install" in line)
    assert any("scripts/prereqs.sh" in line for line in lines[:first_install])

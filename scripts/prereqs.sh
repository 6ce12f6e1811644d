#!/usr/bin/env bash
# What `make serve` and `make test` need, checked before anything is installed:
#
#   bash scripts/prereqs.sh VENV
#
# * Python 3.11 or 3.12 to build VENV with: $PYTHON if set, else the first of python3.11,
#   python3.12 and python3 that runs and is one of those (a pyenv shim for a version
#   that is not selected does not run, so it is skipped), with its venv module;
# * Java 17 or newer (TorchServe's frontend);
# * MIN_FREE_GB (default 8) of free disk where VENV goes, while VENV does not exist yet
#   (torch's wheel with its CUDA libraries takes about 6 GB installed, pip's cache more).
#
# Each missing piece is one line on stderr saying what to install, and the exit status is
# 1. When all is there and VENV does not exist yet, VENV is created with that Python.
# Only bash builtins, `df` and the checked programs are used, so it runs on a bare machine.
set -u

venv=${1:-.venv}
min_free_gb=${MIN_FREE_GB:-8}
problems=()

# The "3.12" of a Python interpreter, or nothing if it does not run.
python_version() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

supported_python() {
    case "$1" in 3.11 | 3.12) return 0 ;; *) return 1 ;; esac
}

# Sets $python to the interpreter to build the environment with, or adds a problem.
find_python() {
    local candidate version
    if [[ -n "${PYTHON:-}" ]]; then
        version=$(python_version "$PYTHON")
        if [[ -z "$version" ]]; then
            problems+=("PYTHON=$PYTHON does not run: set PYTHON to a Python 3.11 or 3.12 interpreter, or leave it unset to search for one")
        elif ! supported_python "$version"; then
            problems+=("PYTHON=$PYTHON is Python $version: this project supports Python 3.11 and 3.12 (torch 2.14.1 and TorchServe 0.12.0 are tested on them)")
        else
            python=$PYTHON
        fi
        return
    fi
    for candidate in python3.11 python3.12 python3; do
        version=$(python_version "$candidate")
        if [[ -n "$version" ]] && supported_python "$version"; then
            python=$candidate
            return
        fi
    done
    problems+=("Python 3.11 or 3.12 not found (tried python3.11, python3.12, python3): install one, e.g. 'apt-get install python3.12 python3.12-venv', or point PYTHON= at it")
}

check_java() {
    local line major
    if ! line=$(java -version 2>&1) || [[ -z "$line" ]]; then
        problems+=("Java not found: TorchServe's frontend needs Java 17 or newer, e.g. 'apt-get install openjdk-17-jre-headless'")
        return
    fi
    # `openjdk version "17.0.15" 2025-04-15`; Java 8 and older say "1.8.0_392".
    if [[ "$line" =~ version\ \"([0-9]+)(\.([0-9]+))? ]]; then
        major=${BASH_REMATCH[1]}
        [[ "$major" == 1 ]] && major=${BASH_REMATCH[3]}
        if ((major < 17)); then
            problems+=("Java $major found: TorchServe's frontend needs Java 17 or newer, e.g. 'apt-get install openjdk-17-jre-headless'")
        fi
    else
        problems+=("cannot tell the version of 'java' (it printed: ${line%%$'\n'*}): TorchServe needs Java 17 or newer")
    fi
}

check_disk() {
    local parent free_kb
    parent=$(dirname "$venv")
    while [[ ! -d "$parent" ]]; do parent=$(dirname "$parent"); done
    free_kb=$(df -Pk "$parent" 2>/dev/null | { read -r _ && read -r _ _ _ available _ && echo "$available"; })
    if [[ -n "$free_kb" ]] && ((free_kb < min_free_gb * 1024 * 1024)); then
        problems+=("only $((free_kb / 1024 / 1024)) GB free in $parent: installing needs about $min_free_gb GB (torch with its CUDA libraries, pip's cache); free some space or put the environment elsewhere with VENV=")
    fi
}

python=""
if [[ -x "$venv/bin/python" ]]; then
    version=$(python_version "$venv/bin/python")
    if ! supported_python "$version"; then
        problems+=("$venv was made with Python ${version:-that no longer runs}: remove it ('rm -rf $venv') and run the command again")
    fi
else
    find_python
    check_disk
fi
check_java

if ((${#problems[@]})); then
    for problem in "${problems[@]}"; do
        echo "missing: $problem" >&2
    done
    exit 1
fi
if [[ -n "$python" ]]; then
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        echo "missing: $python has no venv module: install it, e.g. 'apt-get install python$(python_version "$python")-venv'" >&2
        exit 1
    fi
    echo "creating $venv with $python (Python $(python_version "$python"))"
    "$python" -m venv "$venv" || exit 1
fi
exit 0

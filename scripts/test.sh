#!/usr/bin/env bash
# Builds everything (Release, this CPU) and runs the whole default test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)"
cmake --build build --target all_verify_interface_header_sets -j "$(nproc)"  # every header compiles alone
ctest --test-dir build --output-on-failure -LE long -j "$(nproc)"  # the `long` label: .ci/run runs those too

#!/usr/bin/env bash
# Makes sure the Debian packages longheads builds with are installed: installs the missing
# ones with apt-get when run as root, otherwise names them and the command to run.
set -euo pipefail
packages=(cmake g++ make libeigen3-dev libxsimd-dev doctest-dev libbenchmark-dev libcli11-dev nlohmann-json3-dev libicu-dev gnuplot-nox python3-numpy doxygen
          pybind11-dev python3-pybind11 python3-pytest python3-venv python3-pip
          libopenmpi-dev openmpi-bin)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "longheads: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  echo "longheads: missing Debian packages: ${missing[*]}" >&2
  echo "install them with: sudo apt-get install ${missing[*]}" >&2
  exit 1
fi

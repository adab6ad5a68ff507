#!/usr/bin/env bash
# Install the seeds' own SPI tools used as peers of the native SPI steps:
#   spi_processing 0.1.3  (stages 1-4: hits, centre, size, filter)
#   spi_em_class 0.1.7    (stages 5-6: 2D EM classification, symmetry selection)
#   dragonfly-spi 0.1.0   (stage 7: EMC), with mpi4py 4.1.2 on Debian's Open MPI
#
# Usage: bash scripts/install-spi-peers.sh [VENV]      (default VENV: .venv)
#
# Idempotent: what is already installed at the pinned version is left alone. As root it
# installs the Debian packages Dragonfly builds against (libgsl-dev, libhdf5-dev,
# libopenmpi-dev, openmpi-bin); otherwise it only checks for them. It never fails: when
# something cannot be installed it says so and exits 0, and the peer tests skip with a
# reason naming what is missing.
set -u

VENV=${1:-.venv}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY="$VENV/bin/python"
SPI_PROCESSING=0.1.3
SPI_EM_CLASS=0.1.7
DRAGONFLY=0.1.0
MPI4PY=4.1.2
APT_PKGS=(libgsl-dev libhdf5-dev libopenmpi-dev openmpi-bin pkg-config gcc)

say() { echo "install-spi-peers: $*"; }

if [ ! -x "$PY" ]; then
    say "no Python at $PY; create the venv first (python3 -m venv $VENV && $VENV/bin/pip install -e .); skipped everything"
    exit 0
fi
PIP=("$PY" -m pip install --disable-pip-version-check -q)

installed() {  # installed NAME VERSION -> 0 when NAME==VERSION is in the venv
    "$PY" - "$1" "$2" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]) == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
EOF
}

# --- spi_processing, spi_em_class (pure Python + numba wheels) ---------------------------
if installed spi_processing "$SPI_PROCESSING" && installed spi_em_class "$SPI_EM_CLASS"; then
    say "spi_processing $SPI_PROCESSING and spi_em_class $SPI_EM_CLASS already installed; skipped"
else
    reqs=("spi_processing==$SPI_PROCESSING" "spi_em_class==$SPI_EM_CLASS")
    [ -f "$HERE/envs/spi-tools.txt" ] && reqs=(-r "$HERE/envs/spi-tools.txt")
    if "${PIP[@]}" "${reqs[@]}"; then
        say "installed spi_processing $SPI_PROCESSING and spi_em_class $SPI_EM_CLASS"
    else
        say "could not install spi_processing/spi_em_class (no PyPI access?); their tests will be skipped"
    fi
fi

# --- Dragonfly ---------------------------------------------------------------------------
if installed dragonfly-spi "$DRAGONFLY" && installed mpi4py "$MPI4PY"; then
    say "dragonfly-spi $DRAGONFLY and mpi4py $MPI4PY already installed; skipped"
    exit 0
fi
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing Debian packages ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null || say "apt-get update failed"
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
            || say "could not install ${missing[*]}"
    else
        say "Debian packages ${missing[*]} missing and not root; skipped Dragonfly (its tests will be skipped)"
        exit 0
    fi
fi
for p in libgsl-dev libhdf5-dev libopenmpi-dev; do
    if ! dpkg -s "$p" >/dev/null 2>&1; then
        say "$p is missing; skipped Dragonfly (its tests will be skipped)"
        exit 0
    fi
done
if ! installed mpi4py "$MPI4PY"; then
    # built against Debian's Open MPI (a wheel from PyPI bundles no MPI library)
    if ! "${PIP[@]}" --no-binary mpi4py "mpi4py==$MPI4PY"; then
        say "could not build mpi4py $MPI4PY; skipped Dragonfly (its tests will be skipped)"
        exit 0
    fi
fi
if ! installed dragonfly-spi "$DRAGONFLY"; then
    if CFLAGS=-I/usr/include/hdf5/serial LDFLAGS=-L/usr/lib/x86_64-linux-gnu/hdf5/serial \
        "${PIP[@]}" "dragonfly-spi==$DRAGONFLY"; then
        say "installed dragonfly-spi $DRAGONFLY with mpi4py $MPI4PY"
    else
        say "could not build dragonfly-spi $DRAGONFLY; its tests will be skipped"
        exit 0
    fi
fi
"$PY" -c "import dragonfly, mpi4py" 2>/dev/null || say "dragonfly-spi installed but does not import; its tests will be skipped"
exit 0

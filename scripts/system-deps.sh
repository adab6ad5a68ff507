#!/usr/bin/env bash
# Debian packages used by the test suite: SLURM + munge (scheduler tier), RELION 3.1 (peer
# tests), graphviz (DAG pictures). Installed only as root with apt-get; otherwise the tests that need them are
# skipped with a printed reason.
set -u
PKGS=(slurm-wlm munge graphviz relion)
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system-deps: not root or no apt-get; tests needing ${PKGS[*]} will be skipped if they are missing"
    exit 0
fi
missing=()
for p in "${PKGS[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system-deps: ${PKGS[*]} present"
    exit 0
fi
echo "system-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null || echo "system-deps: apt-get update failed"
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || echo "system-deps: could not install ${missing[*]}; the tests needing them will be skipped"
exit 0

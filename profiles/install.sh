#!/usr/bin/env bash
# Install Conveyor's site profiles (local, mesocentre, gpgpu) where Snakemake finds
# them by name, so that `snakemake --profile mesocentre` works from the repository.
#
#   profiles/install.sh            for you: links in ${XDG_CONFIG_HOME:-~/.config}/snakemake/
#   profiles/install.sh --system   for everyone: copies in /etc/xdg/snakemake/ (root)
#
# Options:
#   --link    link to this checkout (default for a user install): edits made here, in
#             profiles/<name>/config.yaml, apply at once
#   --copy    copy the files (default for --system): edit the installed copies
#   --force   replace an installed profile of the same name that differs (the old
#             one is kept as <name>.bak)
#   --dry-run say what would be done
# The workflow profile (profiles/default) is not installed: Snakemake reads it from
# the repository by itself.
set -euo pipefail

SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NAMES=(local mesocentre gpgpu)

system=0
mode=""
force=0
dry=0
for arg in "$@"; do
    case "$arg" in
        --system) system=1 ;;
        --link) mode=link ;;
        --copy) mode=copy ;;
        --force) force=1 ;;
        --dry-run | -n) dry=1 ;;
        -h | --help)
            sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install.sh: unknown option $arg (see --help)" >&2
            exit 2
            ;;
    esac
done

if [ "$system" = 1 ]; then
    # the first of XDG_CONFIG_DIRS, as Snakemake (platformdirs) reads it
    xdg_dirs="${XDG_CONFIG_DIRS:-/etc/xdg}"
    base="${xdg_dirs%%:*}"
    [ -n "$base" ] || base=/etc/xdg
    mode="${mode:-copy}"
else
    base="${XDG_CONFIG_HOME:-$HOME/.config}"
    mode="${mode:-link}"
fi
DEST="$base/snakemake"

run() {
    if [ "$dry" = 1 ]; then echo "  would run: $*"; else "$@"; fi
}

if [ "$dry" = 0 ]; then
    if ! mkdir -p "$DEST" 2>/dev/null || [ ! -w "$DEST" ]; then
        echo "install.sh: cannot write to $DEST" >&2
        [ "$system" = 1 ] && echo "  (a site-wide install needs root: sudo $0 --system)" >&2
        exit 1
    fi
fi

status=0
for name in "${NAMES[@]}"; do
    src="$SRC/$name"
    dst="$DEST/$name"
    [ -f "$src/config.yaml" ] || { echo "install.sh: $src/config.yaml missing" >&2; exit 1; }

    if [ -L "$dst" ] && [ "$(readlink -f "$dst")" = "$(readlink -f "$src")" ]; then
        if [ "$mode" = link ]; then
            echo "$name: already linked ($dst -> $src)"
            continue
        fi
    elif [ -d "$dst" ] && [ ! -L "$dst" ] && [ "$mode" = copy ] \
        && cmp -s "$src/config.yaml" "$dst/config.yaml"; then
        echo "$name: already installed ($dst)"
        continue
    fi

    if [ -e "$dst" ] || [ -L "$dst" ]; then
        if [ "$force" = 0 ]; then
            echo "$name: $dst exists and differs; kept (use --force to replace it)" >&2
            status=1
            continue
        fi
        run rm -rf "$dst.bak"
        run mv "$dst" "$dst.bak"
        echo "$name: old $dst kept as $dst.bak"
    fi

    if [ "$mode" = link ]; then
        run ln -s "$src" "$dst"
        echo "$name: linked $dst -> $src"
    else
        run mkdir -p "$dst"
        run cp "$src/config.yaml" "$dst/config.yaml"
        [ -f "$SRC/README.md" ] && run cp "$SRC/README.md" "$dst/README.md"
        echo "$name: copied to $dst"
    fi
done

if [ "$status" = 0 ]; then
    echo "Profiles installed in $DEST. Try, from the repository:"
    echo "  snakemake --configfile config/config.yaml --profile mesocentre -n"
fi
exit "$status"

# shellcheck shell=bash
# Shared by scripts/test and scripts/demo: messages, apt packages, the Rust
# toolchain and the cargo target directory. Source it; it defines functions
# and exports CARGO_TARGET_DIR.

log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }
is_ci() { case "${CI:-}" in true | TRUE | True | 1 | yes) return 0 ;; *) return 1 ;; esac; }
is_root() { [[ $(id -u) -eq 0 ]]; }

pkg_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

# ensure_packages PKG...: installs the Debian packages that are missing.
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if ! is_root; then
        die "missing packages: ${missing[*]}
install them with:  sudo apt-get install --no-install-recommends ${missing[*]}"
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || warn "apt-get update reported errors; trying the install anyway"
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# ensure_cargo: finds cargo and sets the target directory. It lives outside
# the clone so RocksDB (14 minutes to compile) is built once per machine.
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
        # shellcheck disable=SC1091
        . "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust with rustup (Debian 12's cargo is older than the rust-version in Cargo.toml)"
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/strata-target}"
    if is_ci; then
        export CARGO_TERM_COLOR=never
    fi
}

# release_ci_bin: sets CI_BIN to $STRATA_CI_BIN, or builds the release `ci`
# (benchmarks measure release builds only).
release_ci_bin() {
    if [[ -n ${STRATA_CI_BIN:-} ]]; then
        CI_BIN=$STRATA_CI_BIN
    else
        ensure_cargo
        log "cargo build --release --workspace --bin ci"
        (cd "$ROOT" && cargo build --release --workspace --bin ci >&2)
        CI_BIN=$CARGO_TARGET_DIR/release/ci
    fi
    [[ -x $CI_BIN ]] || die "no ci binary at $CI_BIN"
}

# bench_work NAME: a fresh directory WORK under BASE=${BENCH_DIR:-/var/tmp/strata-bench}
# (not /tmp: tmpfs), removed on exit unless KEEP=true; FSTYPE is its filesystem, with a
# warning when that is tmpfs. A script with more to undo first (mounts) defines
# bench_before_cleanup.
bench_work() {
    BASE=${BENCH_DIR:-/var/tmp/strata-bench}
    mkdir -p "$BASE"
    WORK=$(mktemp -d "$BASE/$1.XXXXXX")
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    FSTYPE=$(df -T "$WORK" | awk 'NR == 2 { print $2 }')
    if [[ $FSTYPE == tmpfs ]]; then
        log "warning: $BASE is on tmpfs; numbers will not reflect a disk (set BENCH_DIR)"
    fi
}

bench_cleanup() {
    if declare -F bench_before_cleanup >/dev/null; then
        bench_before_cleanup
    fi
    if ${KEEP:-false}; then
        log "kept $WORK"
    else
        rm -rf "$WORK"
    fi
}

#!/usr/bin/env bash
# Cross-builds static, stripped release binaries of smgate for ARM gateways, without Docker.
#
#   scripts/cross-build.sh [aarch64|armv7|all]      (default: all)
#
# Output: target/dist/smgate-<target-triple>. Build artefacts live in target/cross, apart from
# the host's target/release, so a cross build never invalidates a host build and re-running
# the script only re-links what changed (it is idempotent).
#
# Toolchain: Debian bookworm's rustc-web (1.85, /usr/bin/rustc) plus its per-architecture
# standard libraries (libstd-rust-web-dev:arm64 / :armhf) and the GNU cross linkers. No rustup
# targets are needed. The crate declares rust-version = "1.85" and resolver = "3", so Cargo.lock
# picks dependency versions that build with 1.85. This is also why the store uses redb 2.6
# rather than redb 4: redb >= 3 needs rustc >= 1.89, newer than any rustc Debian ships for ARM.
#
# Static glibc (`-C target-feature=+crt-static`): one file to copy onto a board whatever its
# libc, and it is what runs under qemu-user here (dynamically linked ARM binaries hang in
# qemu-user without an ARM sysroot). smgate does no NSS lookups (no user or host names), so
# glibc's static-NSS caveat does not apply.
#
# Prerequisites (Debian bookworm, as root):
#   dpkg --add-architecture arm64 && dpkg --add-architecture armhf && apt-get update
#   apt-get install rustc-web gcc-aarch64-linux-gnu libc6-dev-arm64-cross libstd-rust-web-dev:arm64
#   apt-get install gcc-arm-linux-gnueabihf libc6-dev-armhf-cross libstd-rust-web-dev:armhf
# The :arm64/:armhf standard library must be exactly rustc-web's version. When Debian's armhf
# index lags behind an amd64 rustc-web update, armv7 is skipped with a message (exit 0), not
# failed; aarch64 prerequisites missing is an error.
#
# Environment: RUSTC (default /usr/bin/rustc), CARGO (default cargo).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUSTC=${RUSTC:-/usr/bin/rustc}
CARGO=${CARGO:-cargo}
TARGET_DIR=$ROOT/target/cross
DIST=$ROOT/target/dist

usage() {
    echo "usage: $0 [aarch64|armv7|all]" >&2
    exit 2
}

say() { printf 'cross-build: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# The Debian package version of rustc-web, e.g. 1.85.0+dfsg3-1~deb12u3 (empty if not from dpkg).
rustc_web_version() {
    dpkg-query -W -f='${Version}' rustc-web 2>/dev/null || true
}

# Prints nothing and returns 0 when every prerequisite for $1 (a target triple) is present;
# otherwise prints one reason per line and returns 1.
missing_for() {
    local triple=$1 debarch=$2 linker=$3 gccpkg=$4 libcpkg=$5 ok=0
    command -v "$CARGO" >/dev/null || { echo "cargo not found (install rustup's cargo or Debian's cargo-web)"; ok=1; }
    [ -x "$RUSTC" ] || { echo "$RUSTC not found: apt-get install rustc-web (or set RUSTC)"; ok=1; }
    command -v "$linker" >/dev/null || { echo "$linker not found: apt-get install $gccpkg $libcpkg"; ok=1; }
    if [ -x "$RUSTC" ]; then
        local sysroot libdir
        sysroot=$("$RUSTC" --print sysroot)
        libdir=$sysroot/lib/rustlib/$triple/lib
        if ! compgen -G "$libdir/libstd-*.rlib" >/dev/null; then
            echo "no Rust standard library for $triple in $libdir:"
            echo "  dpkg --add-architecture $debarch && apt-get update && apt-get install libstd-rust-web-dev:$debarch"
            ok=1
        fi
    fi
    local want have
    want=$(rustc_web_version)
    have=$(dpkg-query -W -f='${Version}' "libstd-rust-web-dev:$debarch" 2>/dev/null || true)
    if [ -n "$want" ] && [ -n "$have" ] && [ "$want" != "$have" ]; then
        echo "libstd-rust-web-dev:$debarch is $have but rustc-web is $want (they must match exactly)"
        ok=1
    fi
    return $ok
}

# Why armv7 cannot be built right now, phrased for a human: index lag versus not installed.
armv7_skip_reason() {
    local want cand
    want=$(rustc_web_version)
    cand=$(apt-cache policy libstd-rust-web-dev:armhf 2>/dev/null | awk '/Candidate:/ {print $2}')
    if [ -n "$want" ] && [ -n "$cand" ] && [ "$cand" != "(none)" ] && [ "$cand" != "$want" ]; then
        echo "Debian's armhf index offers libstd-rust-web-dev:armhf $cand but rustc-web is $want;"
        echo "the armhf standard library lags the amd64 compiler, so armv7 cannot be linked until"
        echo "the armhf index catches up (or pin rustc-web to $cand)."
    elif [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
        echo "libstd-rust-web-dev:armhf is not in the apt index (dpkg --add-architecture armhf && apt-get update)."
    fi
}

build() {
    local name=$1 triple debarch linker gccpkg libcpkg strip
    case $name in
        aarch64)
            triple=aarch64-unknown-linux-gnu debarch=arm64 linker=aarch64-linux-gnu-gcc
            gccpkg=gcc-aarch64-linux-gnu libcpkg=libc6-dev-arm64-cross strip=aarch64-linux-gnu-strip ;;
        armv7)
            triple=armv7-unknown-linux-gnueabihf debarch=armhf linker=arm-linux-gnueabihf-gcc
            gccpkg=gcc-arm-linux-gnueabihf libcpkg=libc6-dev-armhf-cross strip=arm-linux-gnueabihf-strip ;;
        *) usage ;;
    esac

    local reasons
    if ! reasons=$(missing_for "$triple" "$debarch" "$linker" "$gccpkg" "$libcpkg"); then
        if [ "$name" = armv7 ]; then
            say "SKIP armv7 ($triple): prerequisites missing:"
            sed 's/^/  /' <<<"$reasons" >&2
            armv7_skip_reason | sed 's/^/  /' >&2
            return 0
        fi
        say "cannot build $name ($triple):"
        sed 's/^/  /' <<<"$reasons" >&2
        exit 1
    fi

    local upper=${triple//-/_}
    upper=${upper^^}
    local start=$SECONDS
    say "building $triple with $("$RUSTC" --version) (target dir $TARGET_DIR)"
    # Per-target variables only, so that host build scripts and proc macros stay native.
    env RUSTC="$RUSTC" \
        "CARGO_TARGET_${upper}_LINKER=$linker" \
        "CC_${triple//-/_}=$linker" \
        "AR_${triple//-/_}=${linker%-gcc}-ar" \
        RUSTFLAGS="-C target-feature=+crt-static" \
        "$CARGO" build --release --no-default-features --bin smgate --target "$triple" --target-dir "$TARGET_DIR"

    mkdir -p "$DIST"
    local out=$DIST/smgate-$triple
    install -m 0755 "$TARGET_DIR/$triple/release/smgate" "$out.tmp"
    # profile.release already strips; strip again with the target's binutils in case a
    # RUSTFLAGS/profile override turned that off. Stripping a stripped file is a no-op.
    if command -v "$strip" >/dev/null; then "$strip" --strip-all "$out.tmp"; fi
    mv -f "$out.tmp" "$out"

    if command -v file >/dev/null; then
        case $(file -b "$out") in
            *"statically linked"*|*"static-pie linked"*) ;;
            *) die "$out is not statically linked: $(file -b "$out")" ;;
        esac
    fi
    local bytes
    bytes=$(stat -c %s "$out")
    say "$out: $bytes bytes ($(awk -v b="$bytes" 'BEGIN { printf "%.2f MiB", b / 1048576 }')), $((SECONDS - start)) s"
}

case ${1:-all} in
    aarch64) build aarch64 ;;
    armv7) build armv7 ;;
    all) build aarch64; build armv7 ;;
    *) usage ;;
esac

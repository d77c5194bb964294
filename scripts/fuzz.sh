#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time and fails on the first crash.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 60)
#
# Works on a stable toolchain: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags, and
# `--sanitizer none` avoids AddressSanitizer, which needs a nightly std. libFuzzer's coverage
# instrumentation (sancov) is still on, so the search is guided; what we lose is ASan's
# detection of memory errors, which safe Rust does not need. Crashing inputs are written to
# fuzz/artifacts/<target>/; reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -s none <target> fuzz/artifacts/<target>/<file>
set -euo pipefail

seconds="${1:-60}"
case "$seconds" in
    ''|*[!0-9]*) echo "usage: $0 [seconds per target]" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

export RUSTC_BOOTSTRAP=1
targets=(chart_definition ledger_row_decode ledger_proofs)
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
done
# Seed the chart corpus with the real definitions (definition, NUL, events).
for def in firmware-config/machines/*.json benches/defs/*.json; do
    [ -e "$def" ] || continue
    events="${def%.json}.events.jsonl"
    seed="fuzz/corpus/chart_definition/seed-$(basename "$def" .json)"
    { cat "$def"; printf '\0'; [ -e "$events" ] && cat "$events"; } > "$seed"
done

cargo fuzz build -s none -O
for target in "${targets[@]}"; do
    echo "== $target: ${seconds}s" >&2
    # -timeout: one input taking longer than 10 s is a hang, reported as a crash.
    # -rss_limit_mb: runaway memory is a crash too.
    cargo fuzz run -s none -O "$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crashes" >&2

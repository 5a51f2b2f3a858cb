#!/usr/bin/env bash
# Instructions per value of the layer's public calls, counted by callgrind on
# build/count_instructions (one thread, fixed data): training forward,
# backward and inference forward, each inclusive of everything it calls.
#   benchmarks/count_instructions.sh [BATCH CHANNELS H W [REPS]]
set -euo pipefail
shape=("${@:-64 1024 1 1}")
read -r B C H W REPS <<<"${shape[*]} "
REPS=${REPS:-10}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
valgrind --tool=callgrind --callgrind-out-file="$out/cg" build/count_instructions "$B" "$C" "$H" "$W" "$REPS" >/dev/null 2>"$out/log"
values=$((B * C * H * W))
callgrind_annotate --inclusive=yes "$out/cg" 2>/dev/null >"$out/ann"
for fn in train_forward train_backward infer_forward; do
    ir=$(grep -E "[:[:space:]]$fn( |$|'|\[)" "$out/ann" | head -1 | awk '{gsub(",", "", $1); print $1}')
    printf '%-15s %12s instructions in %d calls: %6.2f per value\n' "$fn" "${ir:-?}" "$REPS" \
        "$(awk -v ir="${ir:-0}" -v v="$values" -v r="$REPS" 'BEGIN { print ir / (v * r) }')"
done
echo "shape ${B}x${C}x${H}x${W}, $values values, 1 thread, instruction-set path ${DARKNET_BN_SIMD:-chosen at run time}"

#!/bin/bash
# Four GGUF types of one source: four separate `zopt convert` runs against one multi-target run,
# twice; wall time and peak RSS of each, then a byte comparison of the outputs.
#   zopt synth --size medium -o /tmp/medium.safetensors
#   benchmarks/multi_convert.sh /tmp/medium.safetensors /tmp/multi-out
Z="${ZOPT:-nice -n 10 zopt}"
SRC=${1:?source checkpoint}
OUT=${2:?scratch folder (replaced)}
NAME=$(basename "$SRC"); NAME=${NAME%%.*}
rm -rf $OUT; mkdir -p $OUT/sep $OUT/one
# warm: compile cache and page cache
$Z convert $SRC --to gguf:Q8_0 -o $OUT/warm.gguf --no-progress > /dev/null 2>&1; rm -f $OUT/warm.gguf
for round in 1 2; do
start=$(date +%s.%N)
for t in Q8_0 Q6_K Q5_K_M Q4_K_M; do
  /usr/bin/time -f "sep $t wall %e s maxrss %M KB" $Z convert $SRC --to gguf:$t -o $OUT/sep/m-$t.gguf --no-progress --force 2>&1 | grep -v "^zopt:"
done
end=$(date +%s.%N); echo "round $round separate total: $(echo "$end - $start" | bc) s"
/usr/bin/time -f "one-pass wall %e s maxrss %M KB" $Z convert $SRC --to gguf:Q8_0,gguf:Q6_K,gguf:Q5_K_M,gguf:Q4_K_M -o $OUT/one --no-progress --force 2>&1 | grep -v "^zopt:"
done
for t in Q8_0 Q6_K Q5_K_M Q4_K_M; do cmp $OUT/sep/m-$t.gguf $OUT/one/$NAME-$t.gguf && echo "$t identical"; done

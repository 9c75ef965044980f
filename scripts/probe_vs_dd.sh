#!/usr/bin/env bash
# Check `flea probe` against plain tools on the same file in the same session:
#   dd iflag=direct (O_DIRECT sequential read, like the probe's disk sweep),
#   dd buffered after dropping the file from the page cache (dd iflag=nocache count=0),
#   and dd again from the page cache (best of 3 each, as the probe).
# Each dd reads the first MAX bytes, as the probe does with --max-bytes.
#   scripts/probe_vs_dd.sh FILE [MAX_MIB (default 1024)] [FLEA (default target/release/flea)]
set -euo pipefail
file=${1:?usage: probe_vs_dd.sh FILE [MAX_MIB] [FLEA]}
max_mib=${2:-1024}
flea=${3:-target/release/flea}
gbps() { # dd's last line: "N bytes (...) copied, S s, R GB/s" -> bytes/seconds in GB/s
  awk '/copied/ {for (i=1;i<=NF;i++) if ($i=="s,") s=$(i-1); printf "%.2f", $1/s/1e9}'
}
echo "date: $(date -u +%FT%TZ)  load: $(cut -d' ' -f1-3 /proc/loadavg)"
for bs in 1 4 16 64; do
  n=$((max_mib / bs))
  r=$(dd if="$file" of=/dev/null bs=${bs}M count=$n iflag=direct 2>&1 | gbps)
  echo "dd O_DIRECT bs=${bs}M: $r GB/s"
done
# Buffered, best of 3 like the probe: drop the file from the page cache (GNU dd:
# iflag=nocache with count=0 advises DONTNEED), a cold read, then the same from the cache.
best() { sort -g | tail -1; }
cold=(); cached=()
for i in 1 2 3; do
  dd if="$file" iflag=nocache count=0 2>/dev/null
  cold+=("$(dd if="$file" of=/dev/null bs=4M count=$((max_mib / 4)) 2>&1 | gbps)")
  cached+=("$(dd if="$file" of=/dev/null bs=4M count=$((max_mib / 4)) 2>&1 | gbps)")
done
echo "dd buffered bs=4M cold (after nocache): ${cold[*]} GB/s, best $(printf '%s\n' "${cold[@]}" | best)"
echo "dd buffered bs=4M page cache: ${cached[*]} GB/s, best $(printf '%s\n' "${cached[@]}" | best)"
dd if="$file" iflag=nocache count=0 2>/dev/null
"$flea" probe --file "$file" --max-bytes "${max_mib}MiB" --quick --save "${PROBE_SAVE:-/tmp/flea-probe-vs-dd.json}" >/dev/null
for bs in 1 16; do
  n=$((max_mib / bs))
  r=$(dd if="$file" of=/dev/null bs=${bs}M count=$n iflag=direct 2>&1 | gbps)
  echo "dd O_DIRECT bs=${bs}M (after the probe): $r GB/s"
done
python3 - "${PROBE_SAVE:-/tmp/flea-probe-vs-dd.json}" <<'PY'
import json, sys
p = json.load(open(sys.argv[1]))
for d in p["disk_sweep"]:
    print(f"flea probe {d['backend']} O_DIRECT chunk {d['chunk_bytes'] >> 20}M block {d['block_bytes'] >> 10}K "
          f"qd {d['queue_depth']}: {d['bytes_per_sec'] / 1e9:.2f} GB/s")
print(f"flea probe best O_DIRECT: {p['disk_read_bps'] / 1e9:.2f} GB/s ({p['disk_best']})")
print(f"flea probe buffered cold 4M (best of 3): {p['buffered_read_bps'] / 1e9:.2f} GB/s")
print(f"flea probe page cache 4M (best of 3): {p['page_cache_read_bps'] / 1e9:.2f} GB/s")
for t, b in p["mem_curve"]:
    print(f"flea probe memory read {t} threads: {b / 1e9:.1f} GB/s")
for t, b in p["mem_copy_curve"]:
    print(f"flea probe memory copy {t} threads: {b / 1e9:.1f} GB/s")
PY

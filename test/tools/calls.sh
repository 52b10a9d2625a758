#!/usr/bin/env bash
# calls.sh — which src/*.c file calls which (by the nocrm_* functions each
# defines), and whether any of them call each other in a circle.
#   bash test/tools/calls.sh        prints "file -> callees", exits 1 on a cycle
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
graph=$(for f in src/*.c; do
    b=$(basename "$f" .c)
    printf '%s ->' "$b"
    for g in src/*.c; do
        c=$(basename "$g" .c)
        [ "$c" = "$b" ] && continue
        for sym in $(grep -oE '^nocrm_[a-z_0-9]+\(' "$g" | tr -d '(' | sort -u); do
            if grep -qw "$sym" "$f"; then printf ' %s' "$c"; break; fi
        done
    done
    echo
done)
echo "$graph"
python3 - "$graph" <<'PY'
import sys
g = {}
for line in sys.argv[1].splitlines():
    a, b = line.split('->')
    g[a.strip()] = b.split()
cycles = set()
def walk(n, path):
    for m in g.get(n, []):
        if m in path:
            cycles.add(' -> '.join(path[path.index(m):] + [m]))
        elif len(path) < len(g):
            walk(m, path + [m])
for n in g:
    walk(n, [n])
if cycles:
    print('cycles:', *sorted(cycles), sep='\n  ')
    sys.exit(1)
print('no cycle')
PY

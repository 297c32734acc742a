#!/usr/bin/env bash
# Run every vmferry benchmark; JSON results go to the directory given (default: bench-out).
set -euo pipefail
out=${1:-bench-out}
mkdir -p "$out"
cd "$(dirname "$0")/.."
make -s all
# Every benchmark `vmferry bench --help` lists, e.g. {vmm,migrate,devices}.
for b in $(.venv/bin/vmferry bench --help | sed -n 's/.*{\(.*\)}.*/\1/p' | head -1 | tr , ' '); do
    echo "== vmferry bench $b"
    .venv/bin/vmferry bench "$b" --json "$out/$b.json"
done

#!/usr/bin/env bash
# pyvirtio's virtio-net driver vs DPDK's virtio-user frontend on one vhost testpmd (see compare_dpdk.py).
# usage: bench/compare_dpdk.sh [--modes tx,rx] [--rounds 4] [--seconds 5] [--size 64] [--queue-size 1024] [--json]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" bench/compare_dpdk.py "$@"

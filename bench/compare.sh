#!/usr/bin/env bash
# Interleaved comparison of `pyvirtio bench` with the measuring sticks on qemu-storage-daemon.
# See bench/compare.py for options (--rounds, --seconds, --depths, --json).
exec python3 "$(dirname "$0")/compare.py" "$@"

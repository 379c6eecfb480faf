#!/usr/bin/env bash
# System packages the tests need (Debian). Idempotent; skipped when not root.
set -euo pipefail
# g++-aarch64-linux-gnu + qemu-user: the arm target links its .so and runs it under
# qemu-aarch64.
# postgresql: tests/test_search.py starts a throw-away server to run two search workers
# on one PostgreSQL study (skipped when absent).
PKGS=(g++-aarch64-linux-gnu qemu-user postgresql)
if [ "$(id -u)" = "0" ] && [ ${#PKGS[@]} -gt 0 ]; then
    missing=()
    for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    if [ ${#missing[@]} -gt 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
fi

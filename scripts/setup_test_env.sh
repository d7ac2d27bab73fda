#!/usr/bin/env bash
# Test prerequisites that pip cannot install: an OpenSSH server (sshd + ssh-keygen) for the device
# tests, which start their own sshd on 127.0.0.1 with a private config. Idempotent: does nothing
# when sshd and ssh-keygen are already there. Needs root (or sudo) only when it has to install.
set -euo pipefail

have_sshd() {
  command -v sshd >/dev/null 2>&1 || [ -x /usr/sbin/sshd ] || [ -x /usr/local/sbin/sshd ]
}

if have_sshd && command -v ssh-keygen >/dev/null 2>&1; then
  echo "setup_test_env: OpenSSH server present, nothing to do"
else
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "setup_test_env: sshd missing and not root: install openssh-server by hand" >&2; exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_test_env: sshd missing and no apt-get here: install OpenSSH server by hand" >&2; exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # Install from the current package lists; refresh them only if that fails.
  if ! $SUDO apt-get install -y -q --no-install-recommends openssh-server >/dev/null; then
    $SUDO apt-get update -q >/dev/null
    $SUDO apt-get install -y -q --no-install-recommends openssh-server >/dev/null
  fi
  have_sshd || { echo "setup_test_env: openssh-server installed but sshd not found" >&2; exit 1; }
  echo "setup_test_env: installed openssh-server"
fi

# sshd running as root checks its privilege separation directory (tests run sshd -D themselves;
# the package's own service is not started here).
if [ "$(id -u)" -eq 0 ]; then mkdir -p /run/sshd; fi

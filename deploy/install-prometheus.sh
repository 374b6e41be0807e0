#!/usr/bin/env bash
# Prometheus (Debian's package, 2.42) for the end-to-end test that scrapes every service.
# Installed, never started as a system service: the test runs its own on a free port.
set -euo pipefail
if [ -x /usr/bin/prometheus ]; then exit 0; fi
if [ "$(id -u)" != "0" ]; then SUDO=sudo; else SUDO=; fi
# invoke-rc.d asks policy-rc.d before starting a service; 101 means "do not start"
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  trap '$SUDO rm -f "$POLICY"' EXIT
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# a system without policy-rc.d support may have started it anyway: stop it, the tests start their own
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

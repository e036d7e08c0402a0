#!/usr/bin/env bash
# Fresh Debian machine, as root: install what the agent needs and run it in the foreground
# on tap-config/standalone.conf.json (API on 127.0.0.1:3002, no orchestrator needed).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
if ! python3 -m venv --help >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
venv=${ORCHAGENT_VENV:-$repo/.venv}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q -e .
mkdir -p /run/orchestrator-agent /var/lib/orchestrator-agent
cat <<TXT
orchestrator-agent starting on http://127.0.0.1:3002 (Ctrl-C stops it).
The token is written to /run/orchestrator-agent/token. In another shell:
  curl -s "http://127.0.0.1:3002/api/mysql-port?token=\$(cat /run/orchestrator-agent/token)"
TXT
exec "$venv/bin/twistd" --nodaemon --pidfile= orchestrator-agent --config tap-config/standalone.conf.json

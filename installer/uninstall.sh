#!/usr/bin/env bash
# Remove Qwen Appliance: the service, the tray entry and the program. Models and settings stay
# unless --purge.
#
#   installer/uninstall.sh [--purge]
set -euo pipefail

purge=0
case ${1:-} in
    --purge) purge=1 ;;
    "") ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "uninstall.sh: error: unknown option $1 (hint: --purge also removes models and settings)" >&2; exit 1 ;;
esac

data_home=${XDG_DATA_HOME:-$HOME/.local/share}
config_home=${XDG_CONFIG_HOME:-$HOME/.config}
state_home=${XDG_STATE_HOME:-$HOME/.local/state}
config="$config_home/qwen-appliance"
prefix="$data_home/qwen-appliance"
# shellcheck disable=SC1091
[ -f "$config/install.env" ] && . "$config/install.env" && prefix=$PREFIX

if systemctl --user show-environment >/dev/null 2>&1; then
    systemctl --user disable --now appliance.service >/dev/null 2>&1 || true
fi
pidfile="$state_home/qwen-appliance/daemon.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")" || true
fi
rm -f "$config_home/systemd/user/appliance.service" \
      "$config_home/autostart/qwen-appliance-tray.desktop" "$config/install.env"
systemctl --user daemon-reload >/dev/null 2>&1 || true
rm -rf "$prefix/venv" "$state_home/qwen-appliance"

if [ "$purge" = 1 ]; then
    rm -rf "$prefix" "$config"
    echo "Qwen Appliance removed, with its models and settings."
else
    rmdir "$prefix" 2>/dev/null || true
    echo "Qwen Appliance removed. Kept: models in $prefix/models, settings in $config"
    echo "(installer/uninstall.sh --purge removes those too)"
fi

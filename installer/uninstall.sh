#!/usr/bin/env bash
# Remove Qwen Appliance: the service, the tray entry and the program. Models and settings stay
# unless --purge.
#
#   installer/uninstall.sh [--purge]
#
# Only what install.sh created is removed: it lists every file and folder it made in
# ~/.config/qwen-appliance/install.manifest. A folder that was there before (a --prefix like ~,
# a models folder of your own) stays, with everything in it that the installer did not put there.
set -euo pipefail

purge=0
case ${1:-} in
    --purge) purge=1 ;;
    "") ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "uninstall.sh: error: unknown option $1 (hint: --purge also removes models and settings)" >&2; exit 1 ;;
esac

say() { printf '%s\n' "$*"; }
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
config_home=${XDG_CONFIG_HOME:-$HOME/.config}
state_home=${XDG_STATE_HOME:-$HOME/.local/state}
config="$config_home/qwen-appliance"
manifest="$config/install.manifest"
prefix="$data_home/qwen-appliance"
# shellcheck disable=SC1091
[ -f "$config/install.env" ] && . "$config/install.env" && prefix=$PREFIX

# -- stop the daemon -----------------------------------------------------------------------
if systemctl --user show-environment >/dev/null 2>&1; then
    systemctl --user disable --now appliance.service >/dev/null 2>&1 || true
    systemctl --user disable --now appliance-worker.service >/dev/null 2>&1 || true
fi
pidfile="$state_home/qwen-appliance/daemon.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill "$(cat "$pidfile")" || true
fi

# -- remove what the installer made --------------------------------------------------------
# Never these, whatever a manifest says: a hand-edited or damaged one must not cost a home.
protected() {
    case $1 in
        /|"$HOME"|"$HOME"/|"$data_home"|"$config_home"|"$state_home") return 0 ;;
        "$config_home/systemd"|"$config_home/systemd/user"|"$config_home/autostart") return 0 ;;
        /*) ;;
        *) return 0 ;;  # only absolute paths are ours
    esac
    case $HOME/ in "$1"/*) return 0 ;; esac  # an ancestor of home
    return 1
}
remove() {  # KIND PATH
    protected "$2" && { say "kept $2 (not removed by the uninstaller)"; return 0; }
    case $1 in
        dir) [ -d "$2" ] && ! [ -L "$2" ] && rm -rf -- "$2" ;;
        file) [ -f "$2" ] || [ -L "$2" ] && rm -f -- "$2" ;;
    esac
    return 0
}

if [ -f "$manifest" ]; then
    keep=()
    # Newest first, so files go before the folders they are in.
    while IFS=' ' read -r role kind path; do
        [ -n "${path:-}" ] || continue
        if [ "$role" = program ] || [ "$purge" = 1 ]; then
            remove "$kind" "$path"
        else
            keep+=("$role $kind $path")
        fi
    done < <(tac "$manifest")
    if [ "$purge" = 1 ]; then
        rm -f -- "$manifest"
        rmdir -- "$config" 2>/dev/null || true
    elif [ -d "$config" ]; then
        # What --purge removes later; oldest first again.
        if [ ${#keep[@]} -gt 0 ]; then printf '%s\n' "${keep[@]}" | tac > "$manifest"; else rm -f -- "$manifest"; fi
    fi
else
    # Installed before there was a manifest: remove the program only where it is ours by name.
    rm -f "$config_home/systemd/user/appliance.service" \
          "$config_home/autostart/qwen-appliance-tray.desktop" "$config/install.env"
    rm -rf "$state_home/qwen-appliance"
    if [ "$prefix" = "$data_home/qwen-appliance" ]; then
        rm -rf "$prefix/venv"
        if [ "$purge" = 1 ]; then rm -rf "$prefix"; fi
    else
        say "kept $prefix: this install has no manifest and the folder is not the default one"
        say "(remove $prefix/venv, and with --purge $prefix/models, by hand)"
    fi
    if [ "$purge" = 1 ]; then rm -rf "$config"; fi
fi
systemctl --user daemon-reload >/dev/null 2>&1 || true

if [ "$purge" = 1 ]; then
    say "Qwen Appliance removed, with the models and settings its installer created."
else
    say "Qwen Appliance removed. Kept: models in $prefix/models, settings in $config"
    say "(installer/uninstall.sh --purge removes those too)"
fi

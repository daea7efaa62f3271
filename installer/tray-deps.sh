#!/usr/bin/env bash
# What the tray's AppIndicator backend needs inside the appliance's virtual environment.
#
#   installer/tray-deps.sh VENV [--no-build]
#
# GNOME (with its AppIndicator extension) and KDE Plasma show tray icons only as
# StatusNotifierItems over D-Bus; pystray reaches them through its AppIndicator backend, which
# needs PyGObject (`gi`) and the Ayatana AppIndicator typelib. Without them the tray falls back to
# the plain X11 tray: an icon with no menu.
#
# How `gi` gets into the venv: the system's python3-gi, made visible through one .pth file that
# adds a folder holding nothing but a link to the system's `gi` package. Why this and not
# `pip install PyGObject`: python3-gi is built by the distribution against the very
# libgirepository, GLib and typelibs it ships and is updated with them; it needs no compiler and
# no -dev packages; and PyGObject from PyPI is a source build whose newer releases (3.51+) need
# girepository-2.0 (GLib >= 2.80), which Debian 12 and Ubuntu 22.04 lack. Only `gi` is exposed:
# no other system package leaks into the venv. A C extension loads only into the Python
# major.minor it was built for, so the link is made only when the venv's Python matches the
# system's python3 (the check imports it); otherwise, unless --no-build, PyGObject is built with
# pip (pinned below 3.51 where girepository-2.0 is absent) when its build packages are there.
#
# Then it checks the typelib (gir1.2-ayatanaappindicator3-0.1) and, on GNOME, the AppIndicator
# extension, names the one package to add for what is missing, and prints which backend
# `appliance tray` would use now and why (appliance.tray.backend, the same check the tray runs at
# start). Exit status: 0 when the AppIndicator backend's libraries are all there, 1 when not (the
# tray still works, on the X11 fallback), 2 on bad usage. Running it again changes nothing.
set -euo pipefail

say() { printf '==> tray: %s\n' "$*"; }
[ $# -ge 1 ] && [ -x "$1/bin/python" ] || { echo "usage: $0 VENV [--no-build]" >&2; exit 2; }
venv=$1
build=1
[ "${2:-}" = --no-build ] && build=0
py="$venv/bin/python"
system_python=${SYSTEM_PYTHON:-/usr/bin/python3}

has_gi() { "$py" -c 'import gi; gi.require_version("GLib", "2.0"); from gi.repository import GLib' 2>/dev/null; }

if ! has_gi; then
    site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    venv_version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    system_gi="" system_version=""
    if [ -x "$system_python" ]; then
        system_gi=$("$system_python" -c 'import gi, os; print(os.path.dirname(gi.__file__))' 2>/dev/null || true)
        system_version=$("$system_python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    fi
    if [ -n "$system_gi" ] && [ "$system_version" = "$venv_version" ]; then
        mkdir -p "$site/qwen_appliance_system_gi"
        ln -sfn "$system_gi" "$site/qwen_appliance_system_gi/gi"
        echo "$site/qwen_appliance_system_gi" > "$site/qwen-appliance-system-gi.pth"
        if has_gi; then
            say "using the system's PyGObject ($system_gi)"
        else
            rm -rf "$site/qwen_appliance_system_gi" "$site/qwen-appliance-system-gi.pth"
            say "the system's PyGObject does not load in this venv's Python"
        fi
    elif [ -z "$system_gi" ]; then
        say "the system's PyGObject is missing: sudo apt install python3-gi"
    else
        say "the venv's Python is $venv_version, the system's python3-gi is for $system_version"
    fi
fi

if ! has_gi && [ "$build" = 1 ]; then
    if pkg-config --exists girepository-2.0 2>/dev/null; then
        spec="PyGObject"
    else
        spec="PyGObject<3.51"  # the last releases built on girepository-1.0
    fi
    if pkg-config --exists gobject-introspection-1.0 cairo 2>/dev/null \
        && "$py" -m pip --disable-pip-version-check -q install "$spec" >/dev/null 2>&1 && has_gi; then
        say "built $spec"
    else
        say "to build PyGObject: sudo apt install libgirepository1.0-dev libcairo2-dev pkg-config"
    fi
fi

status=0
if has_gi; then
    if ! "$py" -c 'import gi
for ns in ("AppIndicator3", "AyatanaAppIndicator3"):
    try:
        gi.require_version(ns, "0.1")
        break
    except ValueError:
        pass
else:
    raise SystemExit(1)' 2>/dev/null; then
        say "for a tray menu on GNOME and KDE: sudo apt install gir1.2-ayatanaappindicator3-0.1"
        status=1
    fi
else
    status=1
fi

if [[ "${XDG_CURRENT_DESKTOP:-}" == *GNOME* ]] \
    && ! ls -d /usr/share/gnome-shell/extensions/*appindicator* "$HOME"/.local/share/gnome-shell/extensions/*appindicator* >/dev/null 2>&1; then
    say "GNOME shows tray icons only with its AppIndicator extension: sudo apt install gnome-shell-extension-appindicator, then log out and in"
fi

# The verdict, from the same code `appliance tray` runs at start.
"$py" -m appliance.tray.backend 2>/dev/null | sed 's/^/==> /' || true
exit $status

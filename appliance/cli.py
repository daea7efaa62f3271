"""The `appliance` command: one subcommand per job, user mistakes as one line with a hint."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.errors import ApplianceError
from converter.errors import ConversionError


class UserError(Exception):
    """A mistake the user can fix; printed as one line with a hint, exit code 1."""

    def __init__(self, message: str, hint: str = "", code: int = 1) -> None:
        super().__init__(message)
        self.hint = hint
        self.code = code


def fail(message: str, hint: str = "", code: int = 1) -> int:
    line = f"appliance: error: {message}"
    if hint:
        line += f" (hint: {hint})"
    print(line, file=sys.stderr)
    return code


def cmd_convert(args: argparse.Namespace) -> int:
    from converter.pipeline import ConvertOptions, convert
    from converter.quantize import parse_quant_type
    from converter.writer import OutType

    result = convert(ConvertOptions(
        source=args.source, out=args.out, quant=parse_quant_type(args.quant),
        outtype=OutType(args.outtype), force=args.force, keep_intermediate=args.keep_intermediate,
        verify=args.verify, revision=args.revision, threads=args.threads, quiet=args.quiet,
        reranker=args.reranker,
    ))
    if result.report is not None:
        print(result.report.render())
    size = result.output.stat().st_size
    print(f"wrote {result.output} ({size / 2**20:.1f} MiB)")
    if result.intermediate is not None:
        print(f"kept {result.intermediate}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from converter.source import resolve_source
    from converter.verify import is_unquantized, verify

    model = args.gguf.expanduser()
    if not model.is_file():
        raise UserError(f"{model}: no such file", "give the path of a .gguf file")
    reference = resolve_source(args.reference)
    if args.unquantized is not None:
        report = verify(args.unquantized, reference, quantized=model)
    else:
        report = verify(model, reference, judge_logits=is_unquantized(model))
    print(report.render())
    return 0 if report.passed else 1


def _settings(args: argparse.Namespace, quick: bool = False):
    """The settings; `quick` (the library's commands) may take the memo of an earlier call
    with the same inputs, which spares importing pydantic-settings."""
    overrides = {k: getattr(args, k, None) for k in ("host", "port", "models_dir")}
    if getattr(args, "model", None):
        overrides["default_model"] = args.model
    if quick:
        from appliance import settings_snapshot

        remembered = settings_snapshot.load(overrides)
        if remembered is not None:
            return remembered
    from appliance.config import SettingsError, load_settings

    try:
        settings = load_settings(**overrides)
    except SettingsError as e:
        # EX_CONFIG: the units' RestartPreventExitStatus=78, so systemd does not retry a typo.
        raise UserError(str(e), e.hint, code=os.EX_CONFIG) from None
    if quick:
        settings_snapshot.store(settings, overrides)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.server import serve

    settings = _settings(args)
    try:
        settings.read_api_key()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot use the API key file: {e}", "create it with mode 0600") from None
    try:
        settings.read_upstream_keys()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot use an upstream's key file: {e}",
                        "create it with mode 0600", code=os.EX_CONFIG) from None
    return serve(settings)


def _client(args: argparse.Namespace, timeout: float = 5.0, settings: Any = None):
    from appliance.client import DaemonClient, base_url

    settings = settings or _settings(args)
    try:
        key = settings.read_api_key()
    except (OSError, ValueError):
        key = None
    return DaemonClient(getattr(args, "url", None) or base_url(settings), key, timeout)


def _format_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def context_line(model: dict[str, Any]) -> str:
    """`4 slots × 8192 tokens of context, f16 KV (auto: ...)` from a status model entry."""
    line = (f"{model['slots']} slots × {model['context_per_slot']} tokens of context, "
            f"{model.get('kv_cache_type', 'f16')} KV")
    return line + (f" ({model['context_reason']})" if model.get("context_reason") else "")


def cmd_status(args: argparse.Namespace) -> int:
    status = _client(args).status()
    model = status.get("model")
    line = f"daemon {status['version']} (pid {status['pid']}): {status['state']}"
    if model:
        offload = model["offload"]
        line += (f", model {model['id']} on {offload['device']} "
                 f"({offload['n_gpu_layers']}/{offload['n_layers'] + 1} layers), "
                 f"{model['slots_busy']}/{model['slots']} slots busy, "
                 f"{model['tokens_per_second']} tok/s")
    elif status.get("failure"):
        line += f" (last load failed: {status['failure']})"
    print(line)
    if model and "context_per_slot" in model:
        print("  " + context_line(model))
    for share in (model or {}).get("offload", {}).get("split") or ():
        print(f"  {share['name']}: {share['layers']} layers, "
              f"{_format_bytes(share['weights'] + share['kv'] + share['compute'])} planned")
    memory = status["memory"]
    for gpu in memory["gpus"]:
        print(f"  GPU {gpu['index']} {gpu['name']}: {_format_bytes(gpu['used'])} used of "
              f"{_format_bytes(gpu['total'])}, daemon {_format_bytes(gpu['process_used'])}")
    if not memory["gpus"]:
        ram = memory["ram"]
        print(f"  CPU only: RAM {_format_bytes(ram['used'])} used of {_format_bytes(ram['total'])},"
              f" daemon {_format_bytes(ram['process_rss'])}")
    _print_residents(status)
    return 0


def _print_residents(status: dict) -> None:
    from appliance.status_view import resident_table, transition_line, upstream_lines

    table = resident_table(status.get("models") or [])
    if table:
        print()
        print("\n".join(table))
    transition = transition_line(status)
    if transition:
        print(transition)
    upstreams = upstream_lines(status)
    if upstreams:
        print()
        print("\n".join(upstreams))


def cmd_models(args: argparse.Namespace) -> int:
    from appliance.library.commands import cmd_models as list_models

    settings = _settings(args, quick=True)
    return list_models(args, settings, _client(args, timeout=1.0, settings=settings))


def cmd_pull(args: argparse.Namespace) -> int:
    from appliance.library.commands import cmd_pull as pull

    return pull(args, _settings(args, quick=True))


def cmd_rm(args: argparse.Namespace) -> int:
    from appliance.library.commands import cmd_rm as rm

    settings = _settings(args, quick=True)
    return rm(args, settings, _client(args, settings=settings))


def cmd_du(args: argparse.Namespace) -> int:
    from appliance.library.commands import cmd_du as du

    return du(args, _settings(args, quick=True))


def cmd_load(args: argparse.Namespace) -> int:
    status = _client(args).load(args.id)
    # `loaded` names it (an alias resolved); an embedding model is not the chat `model`.
    loaded = next((m for m in status["models"] if m["id"] == status["loaded"]), None)
    if loaded is None:  # already unloaded again (a keep-alive of 0 from another client)
        print(f"loaded {status['loaded']}")
    else:
        print(f"loaded {loaded['id']} ({loaded['kind']}, {loaded['offload']['reason']})")
    return 0


def cmd_unload(args: argparse.Namespace) -> int:
    _client(args).unload(args.id)
    print(f"unloaded {args.id}" if args.id else "unloaded")
    return 0


def cmd_tray(args: argparse.Namespace) -> int:
    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return fail("no graphical display: DISPLAY and WAYLAND_DISPLAY are unset",
                    "run the tray inside your desktop session", code=2)
    from appliance.tray.app import TrayApp
    from appliance.tray.backend import TrayUnavailable
    from appliance.tray.service import DaemonControl

    try:  # chooses the backend (AppIndicator or X11) and says which and why in one line
        TrayApp(_client(args), DaemonControl()).run()
    except TrayUnavailable as e:
        return fail(str(e), "check DISPLAY, or run installer/tray-deps.sh (see README)", code=2)
    return 0


def rpc_server_binary() -> Path | None:
    """llama.cpp's rpc-server: $APPLIANCE_RPC_SERVER, else beside this Python (the installer
    puts it in the venv's bin/), else on PATH."""
    import shutil

    given = os.environ.get("APPLIANCE_RPC_SERVER")
    if given:
        return Path(given)
    beside = Path(sys.executable).parent / "ggml-rpc-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("ggml-rpc-server")
    return Path(found) if found else None


def cmd_worker(args: argparse.Namespace) -> int:
    from appliance.config import is_loopback

    host = args.host or os.environ.get("APPLIANCE_WORKER_HOST") or "127.0.0.1"
    port = args.port or int(os.environ.get("APPLIANCE_WORKER_PORT") or 50052)
    allow = args.allow_network or os.environ.get("APPLIANCE_WORKER_ALLOW_NETWORK") == "1"
    if not 1 <= port <= 65535:
        raise UserError(f"port {port} is out of range", "give 1-65535")
    if not is_loopback(host):
        if not allow:
            raise UserError(f"{host} is reachable from other machines and rpc-server has no "
                            "authentication: anyone who reaches it can run code on its devices",
                            "pass --allow-network on a trusted LAN only, or keep 127.0.0.1 "
                            "and reach it through an SSH tunnel (ssh -L)")
        print(f"appliance worker: warning: listening on {host}:{port} WITHOUT authentication; "
              "use only on a trusted LAN", file=sys.stderr)
    binary = rpc_server_binary()
    if binary is None or not binary.is_file():
        raise UserError("ggml-rpc-server (llama.cpp's RPC worker) is not installed",
                        "run installer/install.sh, or build it with installer/rpc-server.sh "
                        "and set APPLIANCE_RPC_SERVER")
    argv = [str(binary), "--host", host, "--port", str(port)]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    sys.stdout.flush()
    # exec: systemd's signals and the exit status are rpc-server's own.
    os.execv(argv[0], argv)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    convert = sub.add_parser(
        "convert", help="convert a Hugging Face Qwen checkpoint to a quantized GGUF",
        description="Convert Qwen2/Qwen3 safetensors (a local folder or a hub repo id) to GGUF "
                    "and quantize it with llama.cpp.")
    convert.add_argument("source", help="local HF model folder or hub repo id (Qwen/Qwen3-8B)")
    convert.add_argument("--out", type=Path, required=True, help="output .gguf file")
    convert.add_argument("--quant", default="Q4_K_M",
                         help="Q4_K_M (default), Q4_0, Q5_K_M, Q6_K, Q8_0, F16 or BF16")
    convert.add_argument("--outtype", default="auto", choices=["auto", "f32", "bf16", "f16"],
                         help="storage of the unquantized intermediate (auto: bf16 for bf16 "
                              "sources, else f32)")
    convert.add_argument("--revision", help="hub branch, tag or commit")
    convert.add_argument("--force", action="store_true", help="overwrite an existing output")
    convert.add_argument("--keep-intermediate", action="store_true",
                         help="keep the unquantized GGUF next to the output")
    convert.add_argument("--verify", action="store_true",
                         help="check tokenizer and logits against the source before keeping it")
    convert.add_argument("--threads", type=int, help="quantization threads (default: all cores)")
    convert.add_argument("--reranker", action=argparse.BooleanOptionalAction, default=None,
                         help="convert a Qwen3ForCausalLM checkpoint as a Qwen3 reranker (yes/no "
                              "scoring); by default one is recognised by its model card or name")
    convert.add_argument("--quiet", action="store_true", help="no progress bars")
    convert.set_defaults(handler=cmd_convert)

    verify = sub.add_parser("verify", help="check a GGUF against its Hugging Face source",
                            description="Compare a GGUF's tokenizer and logits with the HF model.")
    verify.add_argument("gguf", type=Path)
    verify.add_argument("--reference", required=True, help="HF model folder or hub repo id")
    verify.add_argument("--unquantized", type=Path,
                        help="the unquantized GGUF, to judge it and measure quantization loss")
    verify.set_defaults(handler=cmd_verify)

    serve = sub.add_parser(
        "serve", help="run the daemon (OpenAI-compatible API on localhost)",
        formatter_class=_ServeHelp)
    _address_flags(serve)
    serve.add_argument("--models-dir", type=Path, help="folder of .gguf models")
    serve.add_argument("--model", help="model to load at start-up")
    serve.set_defaults(handler=cmd_serve)

    for name, handler, text in (("status", cmd_status, "show the daemon's state and memory"),
                                ("unload", cmd_unload, "unload one model, or all of them")):
        p = sub.add_parser(name, help=text)
        if name == "unload":
            p.add_argument("id", nargs="?", help="the model to unload (default: every one)")
        _address_flags(p)
        p.add_argument("--url", help="daemon URL (default from settings)")
        p.set_defaults(handler=handler)
    tray = sub.add_parser("tray", help="show the system-tray icon")
    _address_flags(tray)
    tray.add_argument("--url", help="daemon URL (default from settings)")
    tray.set_defaults(handler=cmd_tray)
    _library_parsers(sub)
    worker = sub.add_parser(
        "worker", help="lend this machine's GPU (or CPU) to another daemon over llama.cpp RPC",
        description="Run llama.cpp's rpc-server: a daemon that lists this machine as host:port "
                    "in rpc_workers puts some of a model's layers here. It has no "
                    "authentication: loopback by default (reach it through an SSH tunnel); "
                    "another address needs --allow-network, on a trusted LAN only. Also "
                    "APPLIANCE_WORKER_HOST, APPLIANCE_WORKER_PORT, APPLIANCE_WORKER_ALLOW_NETWORK=1.")
    worker.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    worker.add_argument("--port", type=int, help="port (default 50052)")
    worker.add_argument("--allow-network", action="store_true",
                        help="allow a non-loopback address (no authentication: trusted LAN only)")
    worker.add_argument("--threads", type=int, help="CPU threads when the worker has no GPU")
    worker.set_defaults(handler=cmd_worker)
    load = sub.add_parser("load", help="load (switch to) a model")
    load.add_argument("id")
    _address_flags(load)
    load.add_argument("--url", help="daemon URL (default from settings)")
    load.set_defaults(handler=cmd_load)
    return parser


def _library_parsers(sub: argparse._SubParsersAction) -> None:
    pull = sub.add_parser(
        "pull", help="get a model: a hub GGUF repo, a hub safetensors repo, or a local GGUF",
        description="Download a ready GGUF (Qwen/Qwen3-8B-GGUF[:Q5_K_M]; split files too), or "
                    "a safetensors checkpoint (Qwen/Qwen3-8B) that is converted and quantized, "
                    "or import a local .gguf (hard-linked when on the same disk, else copied). "
                    "Downloads resume, are checked against the hub's sha256, and free space is "
                    "checked first. HF_TOKEN is used for gated repos; HF_ENDPOINT picks a mirror.")
    pull.add_argument("ref", metavar="REF", help="owner/name[:QUANT] or a path to a .gguf")
    pull.add_argument("--quant", help="quantization (default Q4_K_M)")
    pull.add_argument("--revision", help="hub branch, tag or commit")
    pull.add_argument("--dry-run", action="store_true",
                      help="show what would be downloaded, its size and whether it fits here")
    pull.add_argument("--force", action="store_true", help="replace a different model of that id")
    pull.add_argument("--models-dir", type=Path, help="folder of .gguf models")
    pull.set_defaults(handler=cmd_pull)

    models = sub.add_parser("models", help="list the installed models and whether each fits here",
                            description="Read the models folder (the daemon need not run): id, "
                                        "size, quantization, parameters, context, source, and "
                                        "the offload plan and expected decode speed here.")
    models.add_argument("--measure", action="store_true",
                        help="measure this machine's decode speed again")
    models.add_argument("--no-measure", action="store_true",
                        help="do not measure the decode speed even if it was never measured")
    models.add_argument("--models-dir", type=Path, help="folder of .gguf models")
    rm = sub.add_parser("rm", help="remove a model (refused while it is loaded)")
    rm.add_argument("id")
    rm.add_argument("--force", action="store_true", help="unload it first if it is loaded")
    rm.add_argument("--models-dir", type=Path, help="folder of .gguf models")
    du = sub.add_parser("du", help="disk use of the models folder")
    du.add_argument("--models-dir", type=Path, help="folder of .gguf models")
    for p, handler in ((models, cmd_models), (rm, cmd_rm), (du, cmd_du)):
        _address_flags(p)
        p.add_argument("--url", help="daemon URL (default from settings)")
        p.set_defaults(handler=handler)
    _address_flags(pull)


class _ServeHelp(argparse.RawDescriptionHelpFormatter):
    """`serve --help` ends with every setting; they are imported only for it (importing the
    settings costs every other command most of a second)."""

    def format_help(self) -> str:
        from appliance.config import describe_settings

        self.add_text("settings (environment, or the same names in config.toml):\n"
                      + describe_settings())
        return super().format_help()


def _address_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8471)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except ConversionError as e:
        if getattr(e, "report", None) is not None:
            print(e.report.render())
        return fail(str(e), e.hint)
    except UserError as e:
        return fail(str(e), e.hint, e.code)
    except ApplianceError as e:  # the library's errors, and a model that is not there
        return fail(e.message, getattr(e, "hint", "") or _default_hint(e))
    except Exception as e:
        from appliance.client import DaemonError, DaemonUnavailable

        if isinstance(e, DaemonUnavailable):
            return fail(str(e), "start it with `appliance serve` or `systemctl --user start "
                        "appliance`")
        if isinstance(e, DaemonError):
            return fail(str(e))
        raise
    except KeyboardInterrupt:
        return fail("interrupted", code=130)


def _default_hint(e: ApplianceError) -> str:
    from appliance.library.errors import ModelInUse

    return "pass --force to unload it first" if isinstance(e, ModelInUse) else ""


if __name__ == "__main__":
    sys.exit(main())

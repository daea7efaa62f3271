"""llama.cpp's RPC backend: `ggml-rpc-server` workers on other machines as devices for layers.

llama-cpp-python binds none of ggml's RPC functions, so they are reached with ctypes in the
libraries an RPC-enabled wheel ships (libggml-rpc.so, built with -DGGML_RPC=ON).

ggml's RPC client aborts the whole process when a worker cannot be reached (GGML_ABORT), so every
worker is probed here first, in Python, with a timeout: a worker that is down fails the load with
its address and the daemon stays up. A worker serves one client at a time, so a worker a loaded
model of ours already holds is not probed (the probe would wait behind our own connection): its
memory is read through llama.cpp's connection instead.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import WorkerUnavailable

DEFAULT_WORKER_PORT = 50052  # rpc-server's own default
PROBE_TIMEOUT_S = 3.0

# The wire protocol of the vendored llama.cpp (ggml/include/ggml-rpc.h, ggml-rpc.cpp):
# request = cmd (u8) | size (u64) | data; response = size (u64) | data.
PROTO_MAJOR, PROTO_MINOR = 7, 0
_CMD_GET_DEVICE_MEMORY = 11
_CMD_HELLO = 14
_CMD_DEVICE_COUNT = 15
_CONN_CAPS = 24  # RPC_CONN_CAPS_SIZE; all zero: plain TCP, no RDMA
_MAX_DEVICES = 16  # GGML_RPC_MAX_SERVERS bounds a hostile answer


@dataclass(frozen=True)
class WorkerDevice:
    """One device of a worker, as it reports itself now."""

    endpoint: str  # host:port
    index: int  # the device's number on that worker
    free: int
    total: int

    @property
    def name(self) -> str:
        return f"rpc {self.endpoint}" + (f" #{self.index}" if self.index else "")


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host, int(port)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> list[WorkerDevice]:
    """Ask a worker for its devices and their memory, over the RPC protocol itself."""
    host, port = split_endpoint(endpoint)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            hello = _call(sock, _CMD_HELLO, bytes(_CONN_CAPS), 4 + _CONN_CAPS)
            if hello[0] != PROTO_MAJOR or hello[1] > PROTO_MINOR:
                raise WorkerUnavailable(
                    f"RPC worker {endpoint} speaks RPC protocol {hello[0]}.{hello[1]}, this "
                    f"daemon's llama.cpp {PROTO_MAJOR}.{PROTO_MINOR}: run the same appliance "
                    "version there", retry_after=60)
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            if not 0 < count <= _MAX_DEVICES:
                raise WorkerUnavailable(f"RPC worker {endpoint} reports {count} devices",
                                        retry_after=60)
            devices = []
            for index in range(count):
                free, total = struct.unpack("<QQ", _call(
                    sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", index), 16))
                devices.append(WorkerDevice(endpoint, index, free, total))
            return devices
    except TimeoutError:
        why = (f"no answer within {timeout:g} s (a worker serves one daemon at a time: "
               "is another one using it?)")
    except ConnectionError as e:
        why = e.strerror or type(e).__name__
    except OSError as e:  # name resolution, no route, network unreachable
        why = str(e.strerror or e)
    raise WorkerUnavailable(f"RPC worker {endpoint} is unreachable: {why} (start `appliance "
                            "worker` there, or remove it from rpc_workers)", retry_after=10)


def _call(sock: socket.socket, cmd: int, data: bytes, size: int) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(data)) + data)
    header = _read(sock, 8)
    (length,) = struct.unpack("<Q", header)
    if length != size:
        raise ConnectionError(0, f"malformed answer ({length} bytes where {size} were due)")
    return _read(sock, size)


def _read(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise ConnectionError(0, "the worker closed the connection")
        chunks += chunk
    return bytes(chunks)


def llama_lib_dir() -> Path:
    """The folder llama-cpp-python loads libllama (and with it libggml) from: $LLAMA_CPP_LIB_PATH
    when set (its own override), else the wheel's llama_cpp/lib. ggml's device registry lives in
    libggml, so ours must be the very copy llama.cpp uses: a second copy would hold its own
    registry, and devices added there would be unknown to the model loader."""
    import llama_cpp

    override = os.environ.get("LLAMA_CPP_LIB_PATH")
    return Path(override) if override else Path(llama_cpp.__file__).parent / "lib"


class RpcLibrary:
    """ggml's device registry and RPC client, through ctypes on the wheel's own libraries."""

    def __init__(self, lib_dir: Path | None = None) -> None:
        self.lib_dir = lib_dir or llama_lib_dir()
        self._ggml = ctypes.CDLL(str(self.lib_dir / "libggml.so"))
        self._base = ctypes.CDLL(str(self.lib_dir / "libggml-base.so"))
        rpc_path = self.lib_dir / "libggml-rpc.so"
        self._rpc = ctypes.CDLL(str(rpc_path)) if rpc_path.exists() else None
        vp, cp, size = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        for lib, name, args, result in (
                (self._ggml, "ggml_backend_reg_by_name", [cp], vp),
                (self._ggml, "ggml_backend_dev_count", [], size),
                (self._ggml, "ggml_backend_dev_get", [size], vp),
                (self._base, "ggml_backend_reg_dev_count", [vp], size),
                (self._base, "ggml_backend_reg_dev_get", [vp, size], vp),
                (self._base, "ggml_backend_reg_name", [vp], cp),
                (self._base, "ggml_backend_dev_name", [vp], cp),
                (self._base, "ggml_backend_dev_type", [vp], ctypes.c_int),
                (self._base, "ggml_backend_dev_backend_reg", [vp], vp),
                (self._base, "ggml_backend_dev_memory",
                 [vp, ctypes.POINTER(size), ctypes.POINTER(size)], None),
                (self._rpc, "ggml_backend_rpc_add_server", [cp], vp)):
            if lib is not None:
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, result

    @property
    def available(self) -> bool:
        """Whether this llama.cpp was built with the RPC backend and registered it."""
        return self._rpc is not None and bool(self._ggml.ggml_backend_reg_by_name(b"RPC"))

    def worker_devices(self, endpoint: str) -> list[int]:
        """ggml_backend_dev_t of each device of a worker (connects: probe it first)."""
        assert self._rpc is not None
        reg = self._rpc.ggml_backend_rpc_add_server(endpoint.encode())
        if not reg:
            raise WorkerUnavailable(f"RPC worker {endpoint} has no devices", retry_after=60)
        return [self._base.ggml_backend_reg_dev_get(reg, i)
                for i in range(self._base.ggml_backend_reg_dev_count(reg))]

    def memory(self, device: int) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._base.ggml_backend_dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        return free.value, total.value

    def local_gpus(self) -> list[int]:
        """This machine's GPU devices, in llama.cpp's order (none in a CPU build)."""
        gpu_type = 1  # GGML_BACKEND_DEVICE_TYPE_GPU; RPC devices claim it too
        result = []
        for i in range(self._ggml.ggml_backend_dev_count()):
            dev = self._ggml.ggml_backend_dev_get(i)
            reg = self._base.ggml_backend_dev_backend_reg(dev)
            if (self._base.ggml_backend_dev_type(dev) == gpu_type
                    and not self._base.ggml_backend_reg_name(reg).startswith(b"RPC")):
                result.append(dev)
        return result


class RpcLease:
    """The workers one loaded model holds; released once when the model is freed."""

    def __init__(self, workers: RpcWorkers, endpoints: Iterable[str]) -> None:
        self._workers = workers
        self.endpoints = tuple(sorted(set(endpoints)))
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._workers._release(self.endpoints)


class RpcWorkers:
    """The configured workers: what they offer now, their device handles, which ones we hold."""

    def __init__(self, endpoints: Sequence[str], library: RpcLibrary | None = None,
                 timeout_s: float = PROBE_TIMEOUT_S) -> None:
        self.endpoints = list(endpoints)
        self.timeout_s = timeout_s
        self._library = library
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def library(self) -> RpcLibrary:
        if self._library is None:
            self._library = RpcLibrary()
        return self._library

    def survey(self) -> list[WorkerDevice]:
        """Every worker's devices with their free memory now (blocking: network); raises
        WorkerUnavailable naming the first worker that does not answer."""
        if self.endpoints and not self.library.available:
            raise WorkerUnavailable(
                "rpc_workers is set but this llama.cpp has no RPC backend: reinstall with "
                "installer/install.sh (it builds llama-cpp-python with -DGGML_RPC=ON)")
        devices: list[WorkerDevice] = []
        for endpoint in self.endpoints:
            with self._lock:
                held = self._held[endpoint] > 0
            if not held:
                devices += probe(endpoint, self.timeout_s)
                continue
            for index, handle in enumerate(self.library.worker_devices(endpoint)):
                devices.append(WorkerDevice(endpoint, index, *self.library.memory(handle)))
        return devices

    def handles(self, devices: Sequence[WorkerDevice]) -> list[int]:
        """ggml_backend_dev_t for each of `devices`, in order."""
        by_endpoint = {e: self.library.worker_devices(e) for e in {d.endpoint for d in devices}}
        return [by_endpoint[d.endpoint][d.index] for d in devices]

    def lease(self, endpoints: Iterable[str]) -> RpcLease:
        lease = RpcLease(self, endpoints)
        with self._lock:
            self._held.update(lease.endpoints)
        return lease

    def _release(self, endpoints: Iterable[str]) -> None:
        with self._lock:
            self._held.subtract(endpoints)

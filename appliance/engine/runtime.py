"""A loaded llama.cpp model and context, through llama-cpp-python's low-level API.

Only the engine thread calls into a runtime after loading; nothing here is thread-safe.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from appliance.engine.sampling import SamplerChain, SamplingParams
from appliance.errors import LoadFailed

_backend_lock = threading.Lock()
_backend_ready = False

FLASH_ATTN_AUTO = -1
FLASH_ATTN_DISABLED = 0
FLASH_ATTN_ENABLED = 1
# K and V cache types (ggml_type ids) by the names the settings use.
KV_GGML_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                 "q4_0": llama_cpp.GGML_TYPE_Q4_0}


def ensure_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            llama_cpp.llama_backend_init()
            _backend_ready = True


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build can put layers on a GPU (a CUDA build)."""
    ensure_backend()
    return bool(llama_cpp.llama_supports_gpu_offload())


# The weight types ggml's CPU backend repacks, by an instruction set its build reports
# (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type, in the llama.cpp we build).
_REPACKED_BY_FEATURE = {"AVX2": {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}, "AVX512": {"Q2_K"},
                        "DOTPROD": {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0"}}


def repack_types(system_info: str) -> frozenset[str]:
    """The weight types a build with this llama_print_system_info() keeps a repacked copy of
    on the CPU: none unless it was built with REPACK."""
    features = {name.strip() for part in system_info.split("|") if "=" in part
                for name, value in [part.rsplit("=", 1)] if value.strip() == "1"}
    features = {f.split(":")[-1].strip() for f in features}  # "CPU : SSE3" → "SSE3"
    if "REPACK" not in features:
        return frozenset()
    return frozenset().union(*(types for feature, types in _REPACKED_BY_FEATURE.items()
                               if feature in features))


def cpu_repack_types() -> frozenset[str]:
    """The weight types this process's llama.cpp repacks on the CPU."""
    ensure_backend()
    return repack_types(llama_cpp.llama_print_system_info().decode("utf-8", "replace"))


@dataclass(frozen=True)
class ThinkMarkup:
    """Qwen3's thinking tags as single tokens, and the token runs the engine appends itself."""

    open: int  # <think>
    close: int  # </think>
    open_run: list[int]  # "<think>\n": opens thinking in a prompt
    close_run: list[int]  # "\n</think>\n\n": closes it when the budget is spent


@dataclass(frozen=True)
class RuntimeOptions:
    n_gpu_layers: int
    context_per_slot: int
    n_seq: int
    n_threads: int
    flash_attn: bool = True
    n_batch: int = 512
    unified_kv: bool = False
    kv_cache_type: str = "f16"  # K and V alike
    # A split over RPC workers: ggml_backend_dev_t of each device holding layers, in llama.cpp's
    # order, and the offload units each holds (llama.cpp's tensor_split). Empty: the defaults.
    devices: tuple[int, ...] = ()
    tensor_split: tuple[float, ...] = ()


class LlamaRuntime:
    """Model weights, a KV cache with `n_seq` sequences, and a reusable batch."""

    def __init__(self, path: Path, options: RuntimeOptions) -> None:
        ensure_backend()
        self.path = path
        self.options = options
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = options.n_gpu_layers
        self.lease: Any = None  # the RPC workers this model holds (released in close)
        if options.devices:
            # NULL-terminated; llama.cpp copies both arrays while loading.
            devices = (ctypes.c_void_p * (len(options.devices) + 1))(*options.devices, None)
            split = (ctypes.c_float * llama_cpp.llama_max_devices())(*options.tensor_split)
            model_params.devices = ctypes.addressof(devices)
            model_params.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise LoadFailed(f"llama.cpp could not load {path.name} "
                             f"(n_gpu_layers={options.n_gpu_layers})")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)

        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = options.context_per_slot * options.n_seq
        ctx_params.n_batch = options.n_batch
        ctx_params.n_ubatch = options.n_batch
        ctx_params.n_seq_max = options.n_seq
        ctx_params.n_threads = options.n_threads
        ctx_params.n_threads_batch = options.n_threads
        # Split (the default): each sequence owns context_per_slot cells and attends to its own
        # cells only, so conversations cached in idle slots cost an active stream nothing; but
        # llama.cpp runs each run of consecutive sequence ids as its own graph, so the scheduler
        # keeps busy slots together. Unified: any mix of sequences is one graph, but every
        # token attends to all cells in use (bench/batch_ceiling.py measures both).
        ctx_params.kv_unified = options.unified_kv
        ctx_params.flash_attn_type = FLASH_ATTN_AUTO if options.flash_attn else FLASH_ATTN_DISABLED
        ctx_params.type_k = ctx_params.type_v = KV_GGML_TYPES[options.kv_cache_type]
        if options.kv_cache_type != "f16":
            # llama.cpp reads a quantized V cache only inside flash attention; "auto" could
            # still settle on the plain path for a device, so it is asked for outright.
            if not options.flash_attn:
                llama_cpp.llama_model_free(self.model)
                self.model = None
                raise LoadFailed(f"kv_cache_type {options.kv_cache_type} needs flash attention "
                                 "(flash_attn = true)")
            ctx_params.flash_attn_type = FLASH_ATTN_ENABLED
        ctx_params.no_perf = False
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            raise LoadFailed(f"llama.cpp could not create a context of "
                             f"{ctx_params.n_ctx} tokens ({options.kv_cache_type} KV) "
                             f"for {path.name}")
        # A unified cache would let one sequence take every cell; the scheduler holds each to
        # its share so that all slots always fit.
        self.context_per_slot = min(llama_cpp.llama_n_ctx_seq(self.ctx), options.context_per_slot)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(options.n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.think = think_markup(self.tokenize)

    # -- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        size = len(data) + 16
        buffer = (llama_cpp.llama_token * size)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, size, add_special,
                                     parse_special)
        if n < 0:
            size = -n
            buffer = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, size, add_special,
                                         parse_special)
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (control tokens render as nothing)."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0,
                                           False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece),
                                               0, False)
        return self._piece.raw[:n]

    def token_text(self, token: int) -> str:
        return llama_cpp.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")

    def control_texts(self) -> set[str]:
        """The texts of the control tokens (`<|im_start|>`...): what client text must not forge."""
        texts = set()
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_is_control(self.vocab, token):
                text = self.token_text(token)
                if text:
                    texts.add(text)
        return texts

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def chat_template(self) -> str | None:
        raw = llama_cpp.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    # -- decoding --------------------------------------------------------------------------

    def sampler(self, params: SamplingParams) -> SamplerChain:
        """A sampler chain for one request (the caller closes it)."""
        return SamplerChain(self, params)

    def clear_batch(self) -> None:
        self.batch.n_tokens = 0

    def add_to_batch(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (for reading its logits)."""
        b = self.batch
        i = b.n_tokens
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    def decode(self) -> int:
        """Run the batch; 0 on success, 1 when the KV cache has no room, < 0 on error."""
        return llama_cpp.llama_decode(self.ctx, self.batch)

    def forget(self, seq: int, from_pos: int = 0) -> None:
        """Drop a sequence's KV cells from `from_pos` on."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, from_pos, -1)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Give `dst` the KV cells of `src` (a prompt read once for several choices). With a split
        cache llama.cpp copies the stream's buffer at the start of the next decode, before that
        batch writes anything; `dst`'s own cells are dropped."""
        llama_cpp.llama_memory_seq_rm(self.memory, dst, 0, -1)
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, 0, -1)

    def logits(self, batch_index: int) -> np.ndarray:
        """The raw logits at `batch_index` of the last decode (a view: read before the next)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def think_markup(tokenize: Callable[..., list[int]]) -> ThinkMarkup | None:
    """The thinking tags of this vocabulary, or None when they are not single tokens."""
    open_ = tokenize("<think>", add_special=False, parse_special=True)
    close = tokenize("</think>", add_special=False, parse_special=True)
    if len(open_) != 1 or len(close) != 1:
        return None
    return ThinkMarkup(open_[0], close[0],
                       tokenize("<think>\n", add_special=False, parse_special=True),
                       tokenize("\n</think>\n\n", add_special=False, parse_special=True))

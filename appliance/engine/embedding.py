"""An embedding model in llama.cpp: a context with embeddings on and the GGUF's pooling, and a
worker thread of its own that embeds many inputs per llama_decode, one sequence each.

Inputs of one job are packed into few decodes (up to `n_seq` sequences each), so 256 short
chunks cost a few dozen decodes, not 256. The worker never touches a chat model's engine thread;
only it calls into the context.

How many tokens a decode holds depends on where the model computes. On a GPU, all it may
(`n_batch`). On the CPU, about CPU_DECODE_TOKENS: each micro-batch's attention walks every cell
of the cache in use, masked or not (other inputs' cells are masked), so in one decode of 4096
tokens the late micro-batches walk 4096 cells per query for nothing; a decode starts from an
empty cache, so smaller decodes walk only their own tokens. Measured on 2 cores (0.6B Q8_0, 32
inputs of 64 tokens, medians of 3-6): 256 tokens 29.1 s, 512 30.1 s, 4096 31.0 s, 128 30.3 s
(where the matrix products get too narrow).
A reranker (RANK pooling, e.g. Qwen3-Reranker) runs the same way: each input is one formatted
(query, document) prompt, and its row is one score, not a vector.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np

from appliance.engine.compute_turns import NO_TURNS, BatchPace
from appliance.engine.rerank import RerankPrompt
from appliance.engine.runtime import ensure_backend
from appliance.engine.scheduler import lower_thread_priority
from appliance.errors import EngineError, LoadFailed, QueueFull, ServiceUnavailable

CPU_DECODE_TOKENS = 256  # tokens per decode of a model computing on the CPU (see above)

POOLING_NAMES = {llama_cpp.LLAMA_POOLING_TYPE_NONE: "none",
                 llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
                 llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
                 llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
                 llama_cpp.LLAMA_POOLING_TYPE_RANK: "rank"}


@dataclass(frozen=True)
class EmbeddingOptions:
    n_gpu_layers: int
    n_batch: int  # tokens per decode; also the longest input accepted
    n_ubatch: int  # llama.cpp's micro-batch: bounds the compute buffer
    n_seq: int  # inputs per decode
    n_threads: int
    flash_attn: bool = True


class EmbeddingRuntime:
    """Model weights and an embeddings context. Not thread-safe: the worker alone calls embed."""

    def __init__(self, path: Path, options: EmbeddingOptions) -> None:
        ensure_backend()
        self.path = path
        self.options = options
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = options.n_gpu_layers
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise LoadFailed(f"llama.cpp could not load {path.name} "
                             f"(n_gpu_layers={options.n_gpu_layers})")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        params = llama_cpp.llama_context_default_params()
        # One decode holds the whole batch: the KV cache only needs the tokens of that decode,
        # and is cleared between decodes (embedding inputs share nothing).
        params.n_ctx = params.n_batch = options.n_batch
        # A causal model pools the last token: a sequence split across micro-batches reads its
        # earlier tokens from the KV cache, so n_ubatch can stay small.
        params.n_ubatch = min(options.n_ubatch, options.n_batch)
        params.n_seq_max = options.n_seq
        params.kv_unified = True  # any sequence may take any cell: short and long inputs mix
        params.embeddings = True
        params.n_threads = params.n_threads_batch = options.n_threads
        params.flash_attn_type = -1 if options.flash_attn else 0
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            self.model = None
            raise LoadFailed(f"llama.cpp could not create an embeddings context for {path.name}")
        self.pooling = int(llama_cpp.llama_pooling_type(self.ctx))
        if self.pooling in (llama_cpp.LLAMA_POOLING_TYPE_NONE,
                            llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED):
            self.close()
            raise LoadFailed(f"{path.name} stores no pooling type: it is not an embedding model")
        # RANK pooling returns the classifier's outputs per sequence, not an embedding.
        self.rerank: RerankPrompt | None = None
        self.n_out = self.n_embd
        self.score_index = 0
        if self.pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK:
            self._open_reranker()
        self.n_seq = min(options.n_seq, llama_cpp.llama_n_seq_max(self.ctx))
        self.n_batch = options.n_batch
        all_on_gpu = options.n_gpu_layers > llama_cpp.llama_model_n_layer(self.model)
        self.decode_tokens = self.n_batch if all_on_gpu else min(self.n_batch, CPU_DECODE_TOKENS)
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    def _open_reranker(self) -> None:
        """A reranker scores with its rerank prompt; its score is the label "yes" (llama.cpp's
        Qwen3 reranker head is [yes, no] after a softmax), else the first output as
        llama-server reads it."""
        n_out = llama_cpp.llama_model_n_cls_out(self.model)
        labels = [(llama_cpp.llama_model_cls_label(self.model, i) or b"").decode("utf-8", "replace")
                  for i in range(n_out)]
        template = llama_cpp.llama_model_chat_template(self.model, b"rerank")
        if n_out < 1 or not template:
            name = self.path.name
            self.close()
            raise LoadFailed(f"{name} has RANK pooling but no classifier outputs or no rerank "
                             "prompt template (tokenizer.chat_template.rerank): reconvert it with "
                             "`appliance convert --reranker`")
        self.n_out = n_out
        self.score_index = labels.index("yes") if "yes" in labels else 0
        self.rerank = RerankPrompt(template.decode("utf-8", "replace"), self._control_texts(),
                                   self.tokenize)

    def _control_texts(self) -> set[str]:
        """The control tokens' texts (`<|im_end|>`...): client text must not forge them."""
        texts = set()
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_is_control(self.vocab, token):
                text = llama_cpp.llama_vocab_get_text(self.vocab, token)
                if text:
                    texts.add(text.decode("utf-8", "replace"))
        return texts

    @property
    def pooling_name(self) -> str:
        return POOLING_NAMES.get(self.pooling, str(self.pooling))

    def tokenize(self, text: str, add_special: bool = True,
                 parse_special: bool = False) -> list[int]:
        """Tokens as the model embeds them (the GGUF's add-EOS rule applied); client text is
        text, special-token markup included, unless `parse_special` (a template's markup)."""
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

    def embed(self, inputs: list[list[int]], cancelled: Callable[[], bool] = lambda: False,
              pace: BatchPace | None = None) -> np.ndarray:
        """L2-normalized pooled embeddings, one row per input (a reranker: one score per input);
        inputs are packed up to n_seq and `decode_tokens` at a time into each decode (a longer
        input alone). Every input must be 1..n_batch tokens (callers check). With `pace`, each
        decode takes a CPU turn and holds as many tokens as the pace allows now (whole inputs,
        at least one: a vector never depends on how inputs were grouped)."""
        out = np.empty((len(inputs), self.n_out), dtype=np.float32)
        start = 0
        while start < len(inputs):
            if cancelled():
                raise ServiceUnavailable("the request was cancelled")
            budget = self.decode_tokens if pace is None else \
                pace.tokens_per_decode(self.decode_tokens)
            end, tokens = start, 0
            while end < len(inputs) and end - start < self.n_seq \
                    and (end == start or tokens + len(inputs[end]) <= budget):
                tokens += len(inputs[end])
                end += 1
            with contextlib.nullcontext() if pace is None else pace.decode(tokens):
                self._decode_group(inputs[start:end], out[start:end])
            start = end
        if self.rerank is not None:
            return out[:, self.score_index].copy()
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def _decode_group(self, group: list[list[int]], out: np.ndarray) -> None:
        b = self.batch
        n = 0
        for seq, ids in enumerate(group):
            for pos, token in enumerate(ids):
                b.token[n] = token
                b.pos[n] = pos
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = seq
                b.logits[n] = True  # llama.cpp pools over outputs: it wants them all
                n += 1
        b.n_tokens = n
        llama_cpp.llama_memory_clear(self.memory, True)
        status = llama_cpp.llama_decode(self.ctx, b)
        if status != 0:
            raise EngineError(f"llama_decode failed with status {status} on {len(group)} inputs")
        for seq in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)
            if not pointer:
                raise EngineError(f"llama.cpp returned no embedding for sequence {seq}")
            out[seq] = np.ctypeslib.as_array(
                ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(self.n_out,))

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None


@dataclass
class EmbeddingJob:
    """One request's inputs; `done` is called once, on the worker thread, with rows or an error."""

    inputs: list[list[int]]
    done: Callable[[np.ndarray | None, BaseException | None], None]
    cancelled: bool = False
    tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.tokens = sum(len(i) for i in self.inputs)


class EmbeddingWorker:
    """The model's own thread: jobs in arrival order, a bounded queue, a clean stop. `pace`
    shares the CPU with the other resident models (compute_turns.py); by default it never waits
    and decodes full batches."""

    def __init__(self, runtime: EmbeddingRuntime, max_queue: int, nice: int = 0,
                 pace: BatchPace | None = None) -> None:
        self.runtime = runtime
        self.max_queue = max_queue
        self.nice = nice
        self.pace = pace or BatchPace(NO_TURNS)
        self._jobs: queue.Queue[EmbeddingJob | None] = queue.Queue()
        self._stopped = False
        self.busy = False
        self.embedded_inputs = 0
        self._thread = threading.Thread(target=self._run, name="embedding-worker", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: EmbeddingJob) -> None:
        if self._stopped:
            raise ServiceUnavailable("the embedding model is unloading", retry_after=1)
        if self._jobs.qsize() >= self.max_queue + 1:
            raise QueueFull("too many embedding requests are waiting", retry_after=1)
        self._jobs.put(job)

    def _run(self) -> None:
        lower_thread_priority(self.nice)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled:
                continue
            self.busy = True
            try:
                rows = self.runtime.embed(job.inputs, lambda job=job: job.cancelled,
                                          pace=self.pace)
            except BaseException as e:  # one failed job fails alone; the worker serves on
                job.done(None, e if isinstance(e, Exception) else EngineError(repr(e)))
            else:
                self.embedded_inputs += len(job.inputs)
                job.done(rows, None)
            finally:
                self.busy = False

    def stop(self, reason: str) -> None:
        """End queued jobs with `reason`, let the running one finish, join the thread."""
        self._stopped = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.done(None, ServiceUnavailable(reason, retry_after=1))
        self._jobs.put(None)
        self._thread.join(timeout=60)
        self.pace.party.leave()

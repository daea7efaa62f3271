"""Prove an embedding GGUF (Qwen3-Embedding) against transformers: cosine similarity of pooled,
normalized embeddings on the built-in corpus, and ranking agreement on a small retrieval set.

The reference is transformers' AutoModel (the bare Qwen3Model) with last-token pooling and L2
normalization, as Qwen3-Embedding's model card computes it; llama.cpp runs the GGUF with the
pooling type stored in it. Both read the same token ids (the HF tokenizer's, <|endoftext|>
appended), so the check measures the weights and the graph, not tokenization (checked apart).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

import numpy as np

from converter.errors import ConversionError
from converter.verify import LOGIT_PROMPTS, TOKENIZER_CORPUS, Check

COSINE_LIMIT = 0.9999  # unquantized (BF16/F16/F32) files; quantized ones are reported
QUERY_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that " \
                    "answer the query\nQuery: "
QUERIES = ["What is the capital of France?", "How do I sort a list in Python?",
           "天气怎么样？", "Symptoms of the common cold"]
DOCUMENTS = ["Paris is the capital and largest city of France.",
             "Use sorted(items) or items.sort() to sort a list in Python.",
             "今天天气晴朗，气温二十五度。",
             "A cold causes a runny nose, sore throat and coughing.",
             "The Great Wall of China is thousands of kilometres long.",
             "SELECT name FROM users ORDER BY name;"]


def corpus_texts() -> list[str]:
    return TOKENIZER_CORPUS + LOGIT_PROMPTS


def hf_ids(hf_folder: Path, texts: list[str]) -> list[list[int]]:
    """Token ids as Qwen3-Embedding's tokenizer makes them (its post-processor adds the EOS)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    return [tok.encode(t, add_special_tokens=True).ids for t in texts]


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def llama_embeddings(gguf_path: Path, prompts: list[list[int]]) -> np.ndarray:
    """Pooled, normalized embeddings from llama.cpp (the GGUF's own pooling), one row a prompt."""
    return normalize(llama_pooled(gguf_path, prompts).astype(np.float64))


def llama_pooled(gguf_path: Path, prompts: list[list[int]]) -> np.ndarray:
    """llama.cpp's pooled output per prompt, as it returns it: an embedding, or for RANK
    pooling the classifier's outputs (a reranker's [P(yes), P(no)])."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), params)
    if not model:
        raise ConversionError("llama.cpp cannot load the model", "the file is not a valid GGUF",
                              gguf_path)
    n_ctx = max(len(p) for p in prompts) + 8
    ctx_params = llama_cpp.llama_context_default_params()
    ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
    ctx_params.embeddings = True
    ctx_params.n_threads = ctx_params.n_threads_batch = os.cpu_count() or 1
    ctx = llama_cpp.llama_init_from_model(model, ctx_params)
    try:
        pooling = llama_cpp.llama_pooling_type(ctx)
        if pooling == llama_cpp.LLAMA_POOLING_TYPE_NONE:
            raise ConversionError("the GGUF has no pooling type", "reconvert it", gguf_path)
        width = llama_cpp.llama_model_n_cls_out(model) \
            if pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK else llama_cpp.llama_model_n_embd(model)
        memory = llama_cpp.llama_get_memory(ctx)
        rows = []
        batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)
        for ids in prompts:
            llama_cpp.llama_memory_clear(memory, True)
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True  # pooling reads every output
            batch.n_tokens = len(ids)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                llama_cpp.llama_batch_free(batch)
                raise ConversionError("llama.cpp failed to run a prompt", "", gguf_path)
            pointer = llama_cpp.llama_get_embeddings_seq(ctx, 0)
            rows.append(np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(
                ctypes.c_float)), shape=(width,)).copy())
        llama_cpp.llama_batch_free(batch)
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return np.stack(rows)


def reference_embeddings(hf_folder: Path, prompts: list[list[int]]) -> np.ndarray:
    """transformers' AutoModel in float32: the last token's hidden state, normalized."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(hf_folder, dtype=torch.float32)
    model.eval()
    rows = []
    with torch.inference_mode():
        for ids in prompts:  # one at a time: no padding, so the last token is the last position
            hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
            rows.append(hidden.float().numpy())
    return normalize(np.stack(rows).astype(np.float64))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1)


def ranking_agreement(ref: np.ndarray, cand: np.ndarray, n_queries: int) -> tuple[float, float]:
    """(top-1 agreement, full-order agreement) over the queries' document rankings."""
    q_ref, d_ref = ref[:n_queries], ref[n_queries:]
    q_cand, d_cand = cand[:n_queries], cand[n_queries:]
    order_ref = np.argsort(-(q_ref @ d_ref.T), axis=1)
    order_cand = np.argsort(-(q_cand @ d_cand.T), axis=1)
    top1 = float(np.mean(order_ref[:, 0] == order_cand[:, 0]))
    full = float(np.mean(np.all(order_ref == order_cand, axis=1)))
    return top1, full


def retrieval_texts() -> list[str]:
    return [QUERY_INSTRUCTION + q for q in QUERIES] + DOCUMENTS


def llama_ids(gguf_path: Path, texts: list[str]) -> list[list[int]]:
    """llama.cpp's ids with the GGUF's add-BOS/EOS rules applied (as the daemon embeds)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=True, special=True) for t in texts]
    finally:
        llm.close()


def check_embeddings(gguf_path: Path, hf_folder: Path, judged: bool = True) -> Check:
    """The GGUF's pooled embeddings against transformers'; judged for unquantized files."""
    name = "embeddings: GGUF vs transformers reference (cosine)"
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return Check(name, None, ["skipped: transformers and torch are not installed"])
    prompts = hf_ids(hf_folder, corpus_texts() + retrieval_texts())
    # The end-of-text token the model pools must be appended by llama.cpp as by HF.
    eos_ok = llama_ids(gguf_path, corpus_texts()) == prompts[:len(corpus_texts())]
    ref = reference_embeddings(hf_folder, prompts)
    cand = llama_embeddings(gguf_path, prompts)
    n_corpus = len(corpus_texts())
    cos = cosines(ref, cand)
    worst = float(cos.min())
    check = Check(name, False if not eos_ok else (worst >= COSINE_LIMIT if judged else None))
    check.lines.append("special tokens added as Hugging Face adds them: "
                       + ("yes" if eos_ok else "NO (the pooled token differs)"))
    check.lines.append(f"cosine mean {float(cos.mean()):.6f}, worst {worst:.6f} over "
                       f"{len(prompts)} texts (limit {COSINE_LIMIT})")
    top1, full = ranking_agreement(ref[n_corpus:], cand[n_corpus:], len(QUERIES))
    check.lines.append(f"ranking agreement: top-1 {top1 * 100:.0f} %, full order "
                       f"{full * 100:.0f} % over {len(QUERIES)} queries x {len(DOCUMENTS)} docs")
    return check


def check_quantized_embeddings(quantized: Path, unquantized: Path, hf_folder: Path) -> Check:
    """How far quantization moved the embeddings (reported, not judged)."""
    prompts = hf_ids(hf_folder, corpus_texts() + retrieval_texts())
    ref = llama_embeddings(unquantized, prompts)
    cand = llama_embeddings(quantized, prompts)
    cos = cosines(ref, cand)
    top1, full = ranking_agreement(ref[len(corpus_texts()):], cand[len(corpus_texts()):],
                                   len(QUERIES))
    check = Check("quantized vs unquantized GGUF (embeddings)", None)
    check.lines.append(f"cosine mean {float(cos.mean()):.6f}, worst {float(cos.min()):.6f}")
    check.lines.append(f"ranking agreement: top-1 {top1 * 100:.0f} %, full order "
                       f"{full * 100:.0f} %")
    return check

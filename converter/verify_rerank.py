"""Prove a Qwen3 reranker GGUF against transformers: the probability of "yes" for each
(query, document) pair, and the order it ranks each query's documents in.

The reference is transformers' AutoModelForCausalLM on the same prompt (the GGUF's rerank
template, as Qwen3-Reranker's model card builds it): softmax over the last position's logits for
"no" and "yes", taking "yes". llama.cpp runs the GGUF with RANK pooling, whose classifier head
holds just those two rows. Both read the same token ids (the HF tokenizer's; llama.cpp's are
checked equal), so the check measures the head and the graph, not tokenization.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from converter.errors import ConversionError
from converter.verify import Check
from converter.verify_embedding import DOCUMENTS, QUERIES, llama_ids, llama_pooled

SCORE_LIMIT = 1e-2  # worst |P(yes) difference| for unquantized files (BF16 measured 2.6e-3 on
# the tiny synthetic reranker: llama.cpp rounds activations to bf16 in its matmuls); quantized
# files are reported. A swapped or wrong head row moves P(yes) by far more.
_PLACEHOLDER = re.compile(r"\{(query|document)\}")


def format_pair(template: str, query: str, document: str) -> str:
    """The template with {query} and {document} filled in one pass (a query that contains
    "{document}" stays as it is)."""
    values = {"query": query, "document": document}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def rerank_template(gguf_path: Path) -> str:
    import gguf

    try:
        reader = gguf.GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise ConversionError(f"not a readable GGUF ({e})", "check the path", gguf_path) from None
    field = reader.fields.get("tokenizer.chat_template.rerank")
    if field is None:
        raise ConversionError("the reranker GGUF has no rerank prompt template", "reconvert it",
                              gguf_path)
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def pair_texts(template: str) -> list[str]:
    """Every query with every document, query-major."""
    return [format_pair(template, q, d) for q in QUERIES for d in DOCUMENTS]


def hf_ids(hf_folder: Path, texts: list[str]) -> list[list[int]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    return [tok.encode(t, add_special_tokens=False).ids for t in texts]


def reference_scores(hf_folder: Path, prompts: list[list[int]]) -> np.ndarray:
    """transformers in float32: P(yes) from the last position's ["no", "yes"] logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from converter.qwen import rerank_token_ids

    yes, no = rerank_token_ids(hf_folder)
    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    model.eval()
    scores = []
    with torch.inference_mode():
        for ids in prompts:  # one at a time: no padding, so the last token is the last position
            logits = model(torch.tensor([ids])).logits[0, -1, [no, yes]].double()
            scores.append(float(torch.softmax(logits, dim=-1)[1]))
    return np.array(scores)


def llama_scores(gguf_path: Path, prompts: list[list[int]]) -> np.ndarray:
    """P(yes) from llama.cpp: the first of the RANK pooling's two outputs ([yes, no])."""
    return llama_pooled(gguf_path, prompts)[:, 0].astype(np.float64)


def ranking_agreement(ref: np.ndarray, cand: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, full-order agreement) over the queries' document rankings."""
    order_ref = np.argsort(-ref.reshape(len(QUERIES), len(DOCUMENTS)), axis=1, kind="stable")
    order_cand = np.argsort(-cand.reshape(len(QUERIES), len(DOCUMENTS)), axis=1, kind="stable")
    return (float(np.mean(order_ref[:, 0] == order_cand[:, 0])),
            float(np.mean(np.all(order_ref == order_cand, axis=1))))


def _score_lines(ref: np.ndarray, cand: np.ndarray) -> tuple[float, list[str]]:
    diff = np.abs(ref - cand)
    top1, full = ranking_agreement(ref, cand)
    return float(diff.max()), [
        f"P(yes) |difference| mean {float(diff.mean()):.2e}, worst {float(diff.max()):.2e} over "
        f"{len(ref)} pairs",
        f"ranking agreement: top-1 {top1 * 100:.0f} %, full order {full * 100:.0f} % over "
        f"{len(QUERIES)} queries x {len(DOCUMENTS)} docs"]


def check_rerank(gguf_path: Path, hf_folder: Path, judged: bool = True) -> Check:
    """The GGUF's reranker scores against transformers'; judged for unquantized files."""
    name = "reranker: GGUF P(yes) vs transformers reference"
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return Check(name, None, ["skipped: transformers and torch are not installed"])
    texts = pair_texts(rerank_template(gguf_path))
    prompts = hf_ids(hf_folder, texts)
    ids_ok = llama_ids(gguf_path, texts) == prompts
    ref = reference_scores(hf_folder, prompts)
    cand = llama_scores(gguf_path, prompts)
    worst, lines = _score_lines(ref, cand)
    check = Check(name, False if not ids_ok else (worst <= SCORE_LIMIT if judged else None))
    check.lines.append("prompt tokens as Hugging Face makes them: "
                       + ("yes" if ids_ok else "NO (the scored token differs)"))
    lines[0] += f" (limit {SCORE_LIMIT:g})" if judged else " (quantized: reported)"
    check.lines.extend(lines)
    spread = f"reference scores span {float(ref.min()):.3f} .. {float(ref.max()):.3f}"
    check.lines.append(spread)
    return check


def check_quantized_rerank(quantized: Path, unquantized: Path, hf_folder: Path) -> Check:
    """How far quantization moved the scores (reported, not judged)."""
    prompts = hf_ids(hf_folder, pair_texts(rerank_template(unquantized)))
    _, lines = _score_lines(llama_scores(unquantized, prompts), llama_scores(quantized, prompts))
    return Check("quantized vs unquantized GGUF (reranker)", None, lines)

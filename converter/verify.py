"""Prove a converted GGUF against its source: tokenizer ids, logits, and quantization loss.

(1) llama.cpp's tokenizer on the GGUF against Hugging Face `tokenizers` on a multilingual corpus;
(2) the unquantized GGUF under llama.cpp against the transformers reference model: top-1 agreement
    and NMSE (mean squared error over the reference's variance);
(3) the quantized GGUF against the unquantized one: top-1 agreement and mean KL divergence.
(1) and (2) decide pass or fail; (3) is reported.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converter.errors import ConversionError

# Texts the tokenizer must split exactly as Hugging Face does.
TOKENIZER_CORPUS: list[str] = [
    "Hello, world! This is a test of the Qwen tokenizer.",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; we'll see.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "机器学习是人工智能的一个分支。",
    "日本語のテキストも正しく分割されるべきです。",
    "한국어 문장도 확인합니다.",
    "Привет, мир! Как дела?",
    "مرحبا بالعالم",
    "Grüße aus Köln, naïve café, façade, Ångström.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "for (let i = 0; i < 10; i++) { console.log(`value: ${i}`); }",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "Emoji: 😀🎉👍🏽 🇫🇷 👨‍👩‍👧‍👦 ❤️",
    "Numbers: 0 7 42 1234567890 3.5e-10 -0.001 1,000,000 2026-11-29",
    "Whitespace:    four spaces\t\ttwo tabs\n\n\nthree newlines   \n  trailing   ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nLet me think.\n</think>\n\nThe answer is 4.<|endoftext|>",
    "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
    "  leading spaces and trailing spaces  ",
    "MiXeD CaSe, ALLCAPS, snake_case, camelCase, kebab-case",
    "URLs: https://example.com/path?q=1&r=2#frag and mail@example.org",
]

# Prompts whose logits are compared; short so the reference model stays cheap.
LOGIT_PROMPTS: list[str] = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "你好，请介绍一下你自己。",
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]

NMSE_LIMIT = 1e-4


@dataclass
class Check:
    """One section of the report."""

    name: str
    passed: bool | None  # None: not run, or informational only
    lines: list[str] = field(default_factory=list)


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed is not False for c in self.checks)

    def render(self) -> str:
        out = []
        for check in self.checks:
            verdict = {True: "PASS", False: "FAIL", None: "INFO"}[check.passed]
            out.append(f"[{verdict}] {check.name}")
            out.extend(f"       {line}" for line in check.lines)
        out.append("verification " + ("passed" if self.passed else "FAILED"))
        return "\n".join(out)


@contextlib.contextmanager
def open_llama(path: Path, *, vocab_only: bool = False, n_ctx: int = 256) -> Iterator[object]:
    """A llama.cpp model for the checks: CPU only, all cores, quiet, every position's logits."""
    from llama_cpp import Llama

    try:
        model = Llama(model_path=str(path), vocab_only=vocab_only, n_ctx=n_ctx, n_batch=n_ctx,
                      n_gpu_layers=0, logits_all=not vocab_only, n_threads=os.cpu_count(),
                      verbose=False)
    except ValueError as e:
        raise ConversionError(f"llama.cpp cannot load the model ({e})",
                              "the file is not a valid GGUF", path) from None
    try:
        yield model
    finally:
        model.close()


def check_tokenizer(gguf_path: Path, hf_folder: Path) -> Check:
    """(1) Token ids from llama.cpp on the GGUF equal the HF tokenizer's."""
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    mismatches = []
    total = 0
    with open_llama(gguf_path, vocab_only=True) as llm:
        for text in TOKENIZER_CORPUS:
            expected = hf.encode(text, add_special_tokens=False).ids
            got = llm.tokenize(text.encode(), add_bos=False, special=True)
            total += len(expected)
            if got != expected:
                mismatches.append(text)
    check = Check("tokenizer: llama.cpp ids == Hugging Face ids", not mismatches)
    check.lines.append(f"{len(TOKENIZER_CORPUS) - len(mismatches)}/{len(TOKENIZER_CORPUS)} texts "
                       f"identical ({total} tokens)")
    check.lines.extend(f"differs on: {text[:60]!r}" for text in mismatches[:5])
    return check


def prompt_ids(hf_folder: Path) -> list[list[int]]:
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    return [hf.encode(p, add_special_tokens=False).ids for p in LOGIT_PROMPTS]


def llama_logits(gguf_path: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    """Logits at every position of each prompt, from llama.cpp."""
    results = []
    with open_llama(gguf_path, n_ctx=max(len(p) for p in prompts) + 8) as llm:
        for ids in prompts:
            llm.reset()
            llm.eval(ids)
            results.append(np.array(llm.scores[: len(ids)], dtype=np.float32))
    return results


def reference_logits(hf_folder: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    """Logits from the transformers model in float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.float32)
    model.eval()
    results = []
    with torch.inference_mode():
        for ids in prompts:
            out = model(torch.tensor([ids])).logits[0]
            results.append(out.float().numpy())
    return results


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> tuple[float, float, float]:
    """(top-1 agreement, NMSE, mean KL(reference || candidate)) over all positions."""
    ref = np.concatenate(reference)
    cand = np.concatenate(candidate)
    top1 = float(np.mean(ref.argmax(-1) == cand.argmax(-1)))
    nmse = float(np.mean((ref - cand) ** 2) / np.var(ref))

    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(cand)
    kl = float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1)))
    return top1, nmse, kl


def check_logits(gguf_path: Path, hf_folder: Path, judged: bool = True) -> Check:
    """(2) The GGUF's logits against the transformers reference; judged for unquantized files."""
    name = "logits: GGUF vs transformers reference"
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
        return Check(name, None, ["skipped: transformers and torch are not installed"])
    prompts = prompt_ids(hf_folder)
    top1, nmse, kl = compare(reference_logits(hf_folder, prompts), llama_logits(gguf_path, prompts))
    positions = sum(len(p) for p in prompts)
    check = Check(name, top1 == 1.0 and nmse < NMSE_LIMIT if judged else None)
    if not judged:
        check.lines.append("quantized file: the limits apply to F32/BF16/F16 files only")
    check.lines.append(f"top-1 agreement {top1 * 100:.2f} % over {positions} positions")
    check.lines.append(f"NMSE {nmse:.3g} (limit {NMSE_LIMIT:g}), mean KL {kl:.3g}")
    return check


def check_quantized(quantized: Path, unquantized: Path, hf_folder: Path) -> Check:
    """(3) How far quantization moved the logits (reported, not judged)."""
    prompts = prompt_ids(hf_folder)
    top1, nmse, kl = compare(llama_logits(unquantized, prompts), llama_logits(quantized, prompts))
    check = Check("quantized vs unquantized GGUF", None)
    check.lines.append(f"top-1 agreement {top1 * 100:.2f} %, mean KL {kl:.4g}, NMSE {nmse:.3g}")
    return check


def is_unquantized(path: Path) -> bool:
    """Whether every 2-D weight of the GGUF is F32, F16 or BF16."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ConversionError(f"not a readable GGUF ({e})", "check the path", path) from None
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
             gguf.GGMLQuantizationType.BF16}
    return all(t.tensor_type in plain for t in reader.tensors)


def verify(unquantized: Path, hf_folder: Path, quantized: Path | None = None,
           judge_logits: bool = True) -> Report:
    """Run every check that applies and return the report."""
    if pooling_type(unquantized) == RANK_POOLING:  # a reranker: P(yes) per pair
        from converter.verify_rerank import check_quantized_rerank, check_rerank

        report = Report([check_tokenizer(unquantized, hf_folder),
                         check_rerank(unquantized, hf_folder, judge_logits)])
        if quantized is not None and quantized != unquantized:
            report.checks.append(check_quantized_rerank(quantized, unquantized, hf_folder))
        return report
    if is_embedding_model(unquantized):
        # Pooled embeddings instead of logits; imported here: that module builds on this one.
        from converter.verify_embedding import check_embeddings, check_quantized_embeddings

        report = Report([check_tokenizer(unquantized, hf_folder),
                         check_embeddings(unquantized, hf_folder, judge_logits)])
        if quantized is not None and quantized != unquantized:
            report.checks.append(check_quantized_embeddings(quantized, unquantized, hf_folder))
        return report
    report = Report([check_tokenizer(unquantized, hf_folder),
                     check_logits(unquantized, hf_folder, judge_logits)])
    if quantized is not None and quantized != unquantized:
        report.checks.append(check_quantized(quantized, unquantized, hf_folder))
    return report


RANK_POOLING = 4  # gguf.PoolingType.RANK: a reranker's classifier outputs


def is_embedding_model(path: Path) -> bool:
    """Whether the GGUF stores a pooling type (an embedding model or a reranker)."""
    return pooling_type(path) is not None


def pooling_type(path: Path) -> int | None:
    """The GGUF's `<arch>.pooling_type`, None when it has none (a chat model)."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ConversionError(f"not a readable GGUF ({e})", "check the path", path) from None
    arch = reader.fields.get("general.architecture")
    if arch is None:
        return None
    name = bytes(arch.parts[arch.data[0]]).decode()
    field = reader.fields.get(f"{name}.pooling_type")
    return None if field is None else int(field.parts[field.data[0]][0])

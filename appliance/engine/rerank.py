"""A reranker's prompt: one (query, document) pair → the tokens it scores.

Qwen3-Reranker judges a pair through a fixed chat prompt (stored in the GGUF as
`tokenizer.chat_template.rerank`, with `{query}` and `{document}` where the pair goes, as
llama-server fills it); the score is P("yes") at its last token. The template's markup becomes
control tokens; the client's query, document and instruction never do (ControlTextGuard), so a
document cannot close the user turn and answer "yes" for itself.
"""

from __future__ import annotations

import re

from appliance.engine.prompt import ControlTextGuard, Tokenize
from appliance.errors import InvalidValue

# The instruction Qwen3-Reranker's card (and llama.cpp's converter) puts in the template; a
# request's own instruction replaces it.
DEFAULT_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer the "
                       "query")
_INSTRUCT = "<Instruct>: "
_PLACEHOLDER = re.compile(r"\{(query|document|instruction)\}")


class RerankPrompt:
    """Fills the rerank template and tokenizes it, markup parsed and client text not."""

    def __init__(self, template: str, control_texts: set[str], tokenize: Tokenize) -> None:
        # The default instruction becomes a slot of its own, so a request may replace it.
        self.takes_instruction = _INSTRUCT + DEFAULT_INSTRUCTION in template
        self.template = template.replace(_INSTRUCT + DEFAULT_INSTRUCTION,
                                          _INSTRUCT + "{instruction}")
        self._control_texts = control_texts
        self._tokenize = tokenize

    def tokens(self, query: str, document: str, instruction: str | None = None) -> list[int]:
        """Blocking: the pair's prompt tokens. One pass fills every slot, so a query holding
        "{document}" stays literal text."""
        if instruction is not None and not self.takes_instruction:
            raise InvalidValue("this reranker's prompt has no instruction to replace; send no "
                               "instruction", param="instruction")
        guard = ControlTextGuard(self._control_texts)
        values = {"query": guard.protect(query), "document": guard.protect(document),
                  "instruction": guard.protect(DEFAULT_INSTRUCTION if instruction is None
                                                  else instruction)}
        rendered = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)
        return guard.tokenize(rendered, self._tokenize, False)

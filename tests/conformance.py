"""The README's conformance table, made by the tests: endpoint × client library × feature, each
cell the outcome of the test named here (run with the official client against a real daemon).

`tests/conftest.py` records the outcomes and writes `test-artifacts/conformance.md` at the end
of a run; paste it into the README after a full `tests/run`.
"""

from __future__ import annotations

OPENAI = "tests/appliance/test_api.py::"
FEATURES = "tests/appliance/test_openai_features.py::"
OLLAMA = "tests/appliance/test_ollama.py::"
ANTHROPIC = "tests/appliance/test_anthropic.py::"
RESPONSES = "tests/appliance/test_responses.py::"

# test node id → (endpoint, client, feature)
ROWS: dict[str, tuple[str, str, str]] = {
    OPENAI + "test_chat_completion": ("/v1/chat/completions", "openai", "chat"),
    OPENAI + "test_chat_stream_matches_non_stream": ("/v1/chat/completions", "openai", "streaming"),
    OPENAI + "test_json_schema_output_parses": ("/v1/chat/completions", "openai", "json_schema"),
    OPENAI + "test_required_tool_call": ("/v1/chat/completions", "openai", "tools (forced)"),
    FEATURES + "test_streamed_tool_call_is_assembled_by_the_stream_helper":
        ("/v1/chat/completions", "openai", "tool calls streamed"),
    FEATURES + "test_thinking_then_a_tool_call": ("/v1/chat/completions", "openai",
                                                  "thinking, then tools"),
    FEATURES + "test_chat_thinking_budget_splits_reasoning_from_content":
        ("/v1/chat/completions", "openai", "thinking budget"),
    FEATURES + "test_chat_logprobs_shape_and_greedy_top_entry":
        ("/v1/chat/completions", "openai", "logprobs"),
    FEATURES + "test_n_choices_differ_by_seed_and_read_the_prompt_once":
        ("/v1/chat/completions", "openai", "n choices"),
    OPENAI + "test_stop_string_cuts_output": ("/v1/completions", "openai", "stop"),
    FEATURES + "test_completion_logprobs_shape": ("/v1/completions", "openai", "logprobs"),
    OPENAI + "test_unknown_model_is_404": ("/v1/chat/completions", "openai", "errors"),
    FEATURES + "test_one_model_by_id": ("/v1/models/{id}", "openai", "models"),
    OLLAMA + "test_chat_whole_with_measured_timings": ("/api/chat", "ollama", "chat"),
    OLLAMA + "test_chat_stream_matches_whole": ("/api/chat", "ollama", "streaming"),
    OLLAMA + "test_format_schema_and_json": ("/api/chat", "ollama", "format (schema)"),
    OLLAMA + "test_tool_calls_and_thinking_come_back_in_ollamas_shape":
        ("/api/chat", "ollama", "tools, thinking"),
    OLLAMA + "test_seed_reproduces_and_differs": ("/api/chat", "ollama", "options.seed"),
    OLLAMA + "test_keep_alive_zero_unloads_after_the_request": ("/api/chat", "ollama",
                                                                "keep_alive"),
    OLLAMA + "test_generate_whole_and_stream": ("/api/generate", "ollama", "generate"),
    OLLAMA + "test_generate_system_and_raw": ("/api/generate", "ollama", "system, raw"),
    OLLAMA + "test_list_shows_usable_models_with_details": ("/api/tags", "ollama", "list"),
    OLLAMA + "test_show_reads_the_gguf_header": ("/api/show", "ollama", "show"),
    OLLAMA + "test_ps_shows_the_resident_model": ("/api/ps", "ollama", "ps"),
    OLLAMA + "test_unknown_model_is_a_404_response_error": ("/api/chat", "ollama", "errors"),
    ANTHROPIC + "test_create": ("/v1/messages", "anthropic", "create"),
    ANTHROPIC + "test_stream_matches_create": ("/v1/messages", "anthropic", "streaming"),
    ANTHROPIC + "test_thinking_streams_as_a_thinking_block": ("/v1/messages", "anthropic",
                                                              "thinking"),
    ANTHROPIC + "test_the_thinking_budget_closes_thinking_and_the_answer_follows":
        ("/v1/messages", "anthropic", "thinking budget"),
    ANTHROPIC + "test_forced_tool_streams_a_tool_use_block": ("/v1/messages", "anthropic",
                                                              "tools (forced, streamed)"),
    ANTHROPIC + "test_stop_sequences": ("/v1/messages", "anthropic", "stop_sequences"),
    ANTHROPIC + "test_the_prefix_cache_shows_as_cache_read": ("/v1/messages", "anthropic",
                                                              "cache_read_input_tokens"),
    ANTHROPIC + "test_count_tokens_sees_tools_and_thinking": ("/v1/messages/count_tokens",
                                                              "anthropic", "count_tokens"),
    ANTHROPIC + "test_unknown_model_is_not_found": ("/v1/messages", "anthropic", "errors"),
    RESPONSES + "test_create_with_a_string": ("/v1/responses", "openai", "create"),
    RESPONSES + "test_messages_and_instructions_read_as_chat": ("/v1/responses", "openai",
                                                                "messages, instructions"),
    RESPONSES + "test_stream_helper_assembles_what_create_returns": ("/v1/responses", "openai",
                                                                     "streaming"),
    RESPONSES + "test_forced_function_call_streams_and_is_assembled":
        ("/v1/responses", "openai", "function call (forced, streamed)"),
    RESPONSES + "test_a_tool_loop_round_trip": ("/v1/responses", "openai",
                                                "function_call_output round trip"),
    RESPONSES + "test_json_schema_output_parses": ("/v1/responses", "openai",
                                                   "text.format json_schema"),
    RESPONSES + "test_reasoning_comes_back_as_a_reasoning_item": ("/v1/responses", "openai",
                                                                  "reasoning"),
    RESPONSES + "test_unknown_model_is_not_found": ("/v1/responses", "openai", "errors"),
}


def table(outcomes: dict[str, str]) -> str:
    """Markdown: one row per feature; `outcomes` maps node ids to passed/failed/skipped."""
    mark = {"passed": "✅", "failed": "❌", "skipped": "skipped"}
    lines = ["| endpoint | client | feature | result |", "| --- | --- | --- | --- |"]
    for node, (endpoint, client, feature) in ROWS.items():
        result = mark.get(outcomes.get(node, ""), "not run")
        lines.append(f"| `{endpoint}` | `{client}` | {feature} | {result} |")
    return "\n".join(lines) + "\n"

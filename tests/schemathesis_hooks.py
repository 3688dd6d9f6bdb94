"""Schemathesis hooks for tests/test_server_openapi.py: drop generated requests that break the request rules JSON
Schema cannot state (each compares two values), so that 'schema-valid request rejected' means a real contract
gap. The server refuses each of these with a 400 naming the field (tests/test_server*.py check that)."""

import schemathesis

MAX_TOKENS_TRIED = 64  # prompt + max_tokens must fit the context; longer outputs only slow the run down


@schemathesis.hook
def filter_body(ctx, body):
    if not isinstance(body, dict):
        return True
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(max_tokens, int) and max_tokens > MAX_TOKENS_TRIED:
        return False
    min_tokens = body.get("min_tokens")
    if isinstance(min_tokens, int) and min_tokens > (max_tokens if isinstance(max_tokens, int) else 16):
        return False  # min_tokens above max_tokens
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and isinstance(body.get("tools"), list):
        named = (choice.get("function") or {}).get("name") if isinstance(choice.get("function"), dict) else None
        offered = {(t.get("function") or {}).get("name") for t in body["tools"] if isinstance(t, dict)
                   and isinstance(t.get("function"), dict)}
        if named not in offered:
            return False  # a named function that is not among the tools
    return True

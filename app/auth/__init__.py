"""Authorization: SMART scopes, tokens, clients, audit."""

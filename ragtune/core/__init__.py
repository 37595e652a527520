"""ragtune's ground floor: errors, run folder and artifacts, model roles, model loading, LLM backends and the
RAG retrieval/prompt code. It imports no stage and no app module (import-linter checks this in the tests)."""

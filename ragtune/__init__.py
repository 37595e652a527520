"""ragtune, in three layers: `ragtune.app` (CLI, pipeline, serve, config) on top, the stages below it
(`data_prep/` with LlamaIndex, `train/` with TRL + PEFT, `eval/` with Ragas; installed as `ragtune.data_prep`,
`ragtune.train`, `ragtune.eval`), and `ragtune.core` (run directory, LLM backends, gates, RAG prompts) at the bottom.
"""

__version__ = "0.1.0"

"""ragtune: the orchestration core shared by the stages (config, run directory, LLM backends, CLI).

The stages themselves live in `data_prep/` (LlamaIndex), `train/` (TRL + PEFT) and `eval/` (Ragas).
"""

__version__ = "0.1.0"

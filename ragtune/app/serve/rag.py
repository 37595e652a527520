"""`ragtune serve --rag`: a request becomes the prompt the student was trained on, from the run's index."""

import threading
from typing import TYPE_CHECKING

from ragtune.app.serve.admission import BadRequest
from ragtune.core.rag import Chunk, build_rag_messages, load_index, retrieve

if TYPE_CHECKING:
    from llama_index.core import VectorStoreIndex

    from ragtune.app.config import RagtuneConfig
    from ragtune.core.rag import RagPrompts

class RagPrompt:
    """`--rag`: a request becomes the prompt the student was trained on. The last user message is the query; it
    retrieves `similarity_top_k` chunks from the index prep persisted, and `build_rag_messages` puts them in prep's
    template, as eval does. Other messages are dropped: every training row is one system and one user turn."""

    def __init__(self, index: "VectorStoreIndex", top_k: int, prompts: "RagPrompts"):
        self.index, self.top_k, self.prompts = index, top_k, prompts
        self.lock = threading.Lock()  # handlers retrieve from a thread pool; one query embeds at a time

    @classmethod
    def for_run(cls, config: "RagtuneConfig") -> "RagPrompt":
        """The run's index (output_dir/data/index) with its embedding model, top_k and prompts."""
        from ragtune.core.run_dir import RunDir

        index = load_index(config.embedding, RunDir(config.output_dir).index)
        return cls(index, config.data_prep.similarity_top_k, config.data_prep)

    @staticmethod
    def query(messages: list[dict[str, str]]) -> str:
        """The last user message: what is retrieved for, and all of the client's text the prompt keeps."""
        query = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if not query.strip():
            raise BadRequest("ragtune serve --rag answers the last user message from the documents; "
                             "this request has no user message with text.", param="messages")
        return query

    def __call__(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[Chunk]]:
        query = self.query(messages)
        with self.lock:
            chunks = retrieve(self.index, [query], self.top_k)[0]
        return build_rag_messages(query, [c["text"] for c in chunks], self.prompts), chunks

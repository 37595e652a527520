"""The RAG pipeline every stage shares: the persisted LlamaIndex index, retrieval, and the prompt.

prep builds the index and trains on `build_rag_messages`; eval and serve call `load_index`, `retrieve`
and the same `build_rag_messages`, so the student is scored on exactly the retrieval and prompt it
was trained on. LlamaIndex is always given the embedding model explicitly and no LLM, so it never
falls back to its OpenAI defaults.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ragtune.core.artifacts import tmp_path
from ragtune.core.errors import UserFacingError
from ragtune.core.precision import busy

if TYPE_CHECKING:
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import BaseNode
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from ragtune.core.roles import EmbeddingConfig

log = logging.getLogger(__name__)

Chunk = dict[str, Any]  # {"id", "text", "metadata": {"file", "page", ...}, "score"}


class RagPrompts(Protocol):
    """The prompt keys of the `data_prep` section: one prompt for training and eval."""

    system_prompt: str
    closed_book_system_prompt: str
    text_qa_template: str


class IndexNotFound(UserFacingError, FileNotFoundError):
    """The run directory has no persisted index yet."""


def embedding_model(embedding: "EmbeddingConfig") -> "HuggingFaceEmbedding":
    """The configured sentence-transformers model as a LlamaIndex embedding (CPU/GPU picked by torch), in
    `embedding.torch_dtype` (`embedding_dtype`), counting the tokens it embeds for the stage's roofline."""
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from ragtune.core.models import resolve_embedding

    class CountedEmbedding(HuggingFaceEmbedding):
        def _embed(self, inputs: list[Any], prompt_name: str | None = None) -> list[list[float]]:
            with busy():  # a precision probe beside it (a server starting) measures alone
                vectors = super()._embed(inputs, prompt_name)
            count_embedded(self._model, inputs)
            return vectors

    path = resolve_embedding(embedding.model)
    return CountedEmbedding(model_name=path, embed_batch_size=embedding.embed_batch_size,
                            model_kwargs={"torch_dtype": embedding_dtype(embedding, path)})


def embedding_dtype(embedding: "EmbeddingConfig", path: str) -> str:
    """`embedding.torch_dtype` resolved: `auto` is the precision probe's choice at the model's shapes (CPU) or the
    device's bf16 (GPU)."""
    if embedding.torch_dtype != "auto":
        return embedding.torch_dtype
    from transformers import AutoConfig

    from ragtune.core.precision import choose_dtype

    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        model_config = None
    return choose_dtype(model_config=model_config)


def count_embedded(model: Any, texts: list[Any]) -> None:
    """Add the tokens a sentence-transformers `model` just embedded (as it truncates them) to the stage's roofline."""
    from ragtune.core import roofline

    texts = [t for t in texts if isinstance(t, str)]
    if not texts:
        return
    tokens = model.tokenize(texts)["attention_mask"]
    lengths = tokens.sum(dim=1)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    device = str(model.device).split(":")[0]
    encoder = model[0].auto_model.config
    name = str(getattr(encoder, "_name_or_path", "embedding")).rstrip("/").removesuffix("/model")  # a wheel's folder
    roofline.count_forward("embed", encoder, name,
                           tokens=int(lengths.sum()), sequence=float(lengths.float().mean()), logits=0, dtype=dtype,
                           device=device, where=f"sentence-transformers {device} {dtype}")


def build_index(nodes: list["BaseNode"], embed_model: "HuggingFaceEmbedding", persist_dir: Path) -> "VectorStoreIndex":
    """Embed the chunks into a `VectorStoreIndex` and persist it (written to a temp folder, then renamed)."""
    import shutil

    from llama_index.core import Settings, VectorStoreIndex
    from llama_index.core.llms import MockLLM

    Settings.llm = MockLLM()  # retrieval only: never resolve LlamaIndex's default (OpenAI) LLM
    index = VectorStoreIndex(nodes, embed_model=embed_model, show_progress=True)
    tmp = tmp_path(persist_dir)
    index.storage_context.persist(persist_dir=str(tmp))
    shutil.rmtree(persist_dir, ignore_errors=True)
    tmp.rename(persist_dir)
    return index


def load_index(embedding: "EmbeddingConfig", index_dir: Path, embed_model: "HuggingFaceEmbedding | None" = None) -> "VectorStoreIndex":
    """Reload the index prep persisted in `index_dir`, with the configured embedding model (or the user's own index
    prep recorded there, `retriever:`)."""
    from llama_index.core import Settings, StorageContext, load_index_from_storage
    from llama_index.core.llms import MockLLM

    from ragtune.core.retriever import RETRIEVER_FILE, open_recorded

    if (index_dir / RETRIEVER_FILE).is_file():
        return open_recorded(index_dir, embed_model or embedding_model(embedding))
    if not (index_dir / "docstore.json").exists():
        raise IndexNotFound(f"{index_dir}: no persisted index. Run `ragtune prep CONFIG` first.")
    Settings.llm = MockLLM()
    storage = StorageContext.from_defaults(persist_dir=str(index_dir), vector_stores=_vector_stores(index_dir))
    return load_index_from_storage(storage, embed_model=embed_model or embedding_model(embedding))


def _vector_stores(index_dir: Path) -> dict[str, Any] | None:
    """The persisted `SimpleVectorStore`s by namespace, their JSON read as it is: LlamaIndex's own loader decodes
    every float through dataclasses_json, 6 s for the demo's 2,597 chunks, most of eval's retrieval. None (LlamaIndex
    loads them) for a folder without namespaced stores."""
    from llama_index.core.vector_stores.simple import NAMESPACE_SEP, SimpleVectorStore, SimpleVectorStoreData

    paths = sorted(index_dir.glob(f"*{NAMESPACE_SEP}vector_store.json"))
    return {path.name.split(NAMESPACE_SEP)[0]: SimpleVectorStore(data=SimpleVectorStoreData(
        **json.loads(path.read_text(encoding="utf-8")))) for path in paths} or None


def retrieve(index: "VectorStoreIndex", questions: list[str], top_k: int,
             node_ids: list[str] | None = None) -> list[list[Chunk]]:
    """The `top_k` chunks for each question, best first; question embeddings are computed in batches.
    `node_ids` restricts the search to those chunks (LlamaIndex's `VectorIndexRetriever(node_ids=...)`): prep's
    training rows see only train-region chunks."""
    from llama_index.core.indices.vector_store.retrievers import VectorIndexRetriever
    from llama_index.core.schema import QueryBundle

    embed_model = index._embed_model
    batch_size = getattr(embed_model, "embed_batch_size", 32)
    embeddings: list[list[float]] = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start : start + batch_size]
        if hasattr(embed_model, "_embed"):
            # HuggingFaceEmbedding: what get_query_embedding does for one query, for a whole batch
            embeddings.extend(embed_model._embed(batch, prompt_name="query"))
        else:
            embeddings.extend(embed_model.get_query_embedding(q) for q in batch)
    retriever = (index.as_retriever(similarity_top_k=top_k) if node_ids is None
                 else VectorIndexRetriever(index, similarity_top_k=top_k, node_ids=node_ids))
    results = []
    for question, embedding in zip(questions, embeddings):
        hits = retriever.retrieve(QueryBundle(query_str=question, embedding=embedding))
        results.append([
            {"id": hit.node.node_id, "text": hit.node.get_content(), "metadata": dict(hit.node.metadata),
             "score": float(hit.score) if hit.score is not None else None}
            for hit in hits
        ])
    return results


def build_rag_messages(question: str, contexts: list[str], prep_config: RagPrompts) -> list[dict[str, str]]:
    """System + user messages for a question answered from retrieved contexts (train and eval use this).

    Contexts are joined the way LlamaIndex's response synthesizer joins chunks (blank line between).
    """
    context_str = "\n\n".join(contexts)
    user = prep_config.text_qa_template.replace("{context_str}", context_str).replace("{query_str}", question)
    return [{"role": "system", "content": prep_config.system_prompt}, {"role": "user", "content": user}]


def build_closed_book_messages(question: str, prep_config: RagPrompts) -> list[dict[str, str]]:
    """System + user messages for a question asked without any context (closed-book mode)."""
    return [{"role": "system", "content": prep_config.closed_book_system_prompt}, {"role": "user", "content": question}]

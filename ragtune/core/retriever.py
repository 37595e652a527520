"""Bring your own index: the `retriever:` section, and the user's LlamaIndex index it opens.

A user who already runs a LlamaIndex RAG pipeline points ragtune at its index instead of at `documents:`: a folder
`index.storage_context.persist(persist_dir=...)` wrote (reopened with `load_index_from_storage`), or a vector store
through its LlamaIndex integration (`VectorStoreIndex.from_vector_store`). Prep takes that index's nodes as its
chunks (`stored_nodes`) and retrieves through it; it records the index in data/index/retriever.json (`record`), so
eval and serve (`ragtune.core.rag.load_index`) retrieve through the very same one.

Queries are embedded by `embedding.model`, which must be the model the index was built with: LlamaIndex stores no
embedding model, so the config names it (`retriever_errors`) and `open_index` checks its dimension against the
stored vectors. The vector-store integration is imported only when a config uses it.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import field_validator, model_validator

from ragtune.core.artifacts import write_json
from ragtune.core.errors import UserFacingError
from ragtune.core.roles import Strict
from ragtune.core.run_dir import short_hash

if TYPE_CHECKING:
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.schema import BaseNode
    from llama_index.vector_stores.qdrant import QdrantVectorStore

RETRIEVER_FILE = "retriever.json"  # in data/index/: the user's index prep retrieved through
# points per Qdrant scroll request while reading a collection's nodes: a collection streams in pages (a page of
# 512-token nodes is about half a megabyte of payload) instead of one call that holds every point at once
SCROLL_PAGE = 256
QDRANT_EXTRA = "pip install 'ragtune[qdrant]' (LlamaIndex's llama-index-vector-stores-qdrant)"


class RetrieverError(UserFacingError):
    """The user's index cannot be opened or read as configured; says which key to change."""


class RetrieverConfig(Strict):
    """Where the user's LlamaIndex index is: `persist_dir` (a persisted index), or `vector_store` with its
    integration's arguments. Key names are LlamaIndex's and the store client's."""

    # a persisted index: StorageContext.from_defaults(persist_dir=...), then load_index_from_storage(index_id=...)
    persist_dir: Path | None = None
    index_id: str | None = None  # needed only when the storage holds several indexes
    # a vector store through its LlamaIndex integration: QdrantVectorStore(client, collection_name=...)
    vector_store: Literal["qdrant"] | None = None
    collection_name: str | None = None
    path: Path | None = None  # QdrantClient(path=...): Qdrant's local mode, in this process
    url: str | None = None  # QdrantClient(url=...): a Qdrant server
    api_key_env: str | None = None  # the name of the environment variable holding the server's API key

    @field_validator("persist_dir", "path")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        """Relative to the working directory, as `documents:` are; recorded absolute for eval and serve."""
        return None if value is None else value.expanduser().resolve()

    @model_validator(mode="after")
    def _one_index(self) -> "RetrieverConfig":
        if (self.persist_dir is None) == (self.vector_store is None):
            raise ValueError("set one of `persist_dir` (a persisted LlamaIndex index) and `vector_store: qdrant`")
        store_keys = [k for k in ("collection_name", "path", "url", "api_key_env") if getattr(self, k) is not None]
        if self.persist_dir is not None:
            if store_keys:
                raise ValueError(f"`{store_keys[0]}` is a `vector_store:` key; a persisted index takes `persist_dir` "
                                 "and `index_id`")
            if not (self.persist_dir / "docstore.json").is_file():
                raise ValueError(f"{self.persist_dir}: no persisted LlamaIndex index (no docstore.json). Point "
                                 "persist_dir at the folder `index.storage_context.persist(persist_dir=...)` wrote")
            return self
        if self.index_id is not None:
            raise ValueError("`index_id` selects an index of a `persist_dir` storage; a vector store has none")
        if not self.collection_name:
            raise ValueError("`vector_store: qdrant` needs `collection_name`: the collection your index was built in")
        if (self.path is None) == (self.url is None):
            raise ValueError("`vector_store: qdrant` needs one of `path` (Qdrant's local mode folder) and `url`")
        if self.path is not None and not self.path.is_dir():
            raise ValueError(f"{self.path}: no such folder. Point `path` at the folder of QdrantClient(path=...)")
        if self.api_key_env is not None and self.url is None:
            raise ValueError("`api_key_env` is for a Qdrant server (`url`); local mode (`path`) has no key")
        return self

    def describe(self) -> str:
        """The index in words, for facts, logs and errors."""
        if self.persist_dir is not None:
            return f"the LlamaIndex index persisted in {self.persist_dir}" + (
                f" (index_id {self.index_id})" if self.index_id else "")
        return f"{self.vector_store} collection `{self.collection_name}` at {self.path or self.url}"


def retriever_errors(retriever: RetrieverConfig | None, documents: list[str], embedding_set: bool
                     ) -> list[tuple[str, str]]:
    """(key path, message) for the top-level keys that go with `retriever:`: prep reads either your index or
    `documents:`, and queries must be embedded by the model your index was built with."""
    if retriever is None:
        if not documents:
            return [("documents", "required key is missing. List the files prep reads (files, globs, folders), or "
                                  "set `retriever:` to take the nodes of your own LlamaIndex index.")]
        return []
    errors = []
    if documents:
        errors.append(("documents", "prep takes its nodes from `retriever:` and reads no documents: remove "
                                    "`documents:` (over a base config: `documents: []`)."))
    if not embedding_set:
        errors.append(("embedding", "`retriever:` needs `embedding: {model: ...}` set to the model your index was "
                                    "built with: queries must be embedded as its nodes were, and LlamaIndex does not "
                                    "store which model that was."))
    return errors


# --- opening the index and reading its nodes ---------------------------------------------------------------------


def open_index(retriever: RetrieverConfig, embed_model: "BaseEmbedding") -> "VectorStoreIndex":
    """The user's index as a `VectorStoreIndex` whose queries `embed_model` embeds (checked against its vectors)."""
    from llama_index.core import Settings, VectorStoreIndex, load_index_from_storage
    from llama_index.core.llms import MockLLM

    Settings.llm = MockLLM()  # retrieval only: never resolve LlamaIndex's default (OpenAI) LLM
    if retriever.persist_dir is not None:
        storage = _storage(retriever)
        index = load_index_from_storage(storage, index_id=_index_struct(storage, retriever).index_id,
                                        embed_model=embed_model)
        stored = getattr(getattr(index.vector_store, "data", None), "embedding_dict", {})  # a SimpleVectorStore's
        dimension = next((len(vector) for vector in stored.values()), None)
    else:
        store = _qdrant_store(retriever)
        index = VectorStoreIndex.from_vector_store(store, embed_model=embed_model)
        dimension = _qdrant_dimension(store)
    _check_dimension(dimension, embed_model, retriever)
    return index


def stored_nodes(retriever: RetrieverConfig) -> list["BaseNode"]:
    """Every node of the user's index, in the store's order: the docstore's nodes of a persisted index, or every
    point of the collection read back into nodes by the integration (its `parse_to_query_result`)."""
    if retriever.persist_dir is not None:
        storage = _storage(retriever)
        ids = list(_index_struct(storage, retriever).nodes_dict.values())
        return storage.docstore.get_nodes(ids, raise_error=False)  # a node missing from the docstore is left out
    store = _qdrant_store(retriever)
    nodes: list[BaseNode] = []
    offset = None
    while True:
        points, offset = store.client.scroll(retriever.collection_name, limit=SCROLL_PAGE, offset=offset,
                                             with_payload=True, with_vectors=False)
        nodes.extend(store.parse_to_query_result(points).nodes)
        if offset is None:
            return nodes


def content_fingerprint(nodes: list["BaseNode"]) -> str:
    """What prep takes from the index: each node's id, text and metadata (a re-indexed corpus changes it)."""
    return short_hash([[node.node_id, node.get_content(), node.metadata] for node in nodes])


def store_fingerprint(retriever: RetrieverConfig) -> str:
    """The index and its content, for the pipeline's prep inputs: a changed index re-runs prep as changed documents
    do."""
    return short_hash(retriever.model_dump(mode="json"), content_fingerprint(stored_nodes(retriever)))


# --- the record eval and serve reopen ----------------------------------------------------------------------------


def record(index_dir: Path, retriever: RetrieverConfig, embedding_model: str, fingerprint: str) -> None:
    """Write data/index/retriever.json: which index prep retrieved through (and what it held), for eval and serve;
    eval's retrieval fingerprint hashes this file, so a changed index retrieves again."""
    index_dir.mkdir(parents=True, exist_ok=True)
    write_json(index_dir / RETRIEVER_FILE, {"retriever": retriever.model_dump(mode="json"),
                                            "embedding_model": embedding_model, "fingerprint": fingerprint})


def open_recorded(index_dir: Path, embed_model: "BaseEmbedding") -> "VectorStoreIndex":
    """The index prep recorded in `index_dir` (`record`), opened again."""
    recorded = json.loads((index_dir / RETRIEVER_FILE).read_text(encoding="utf-8"))
    return open_index(RetrieverConfig.model_validate(recorded["retriever"]), embed_model)


# --- helpers -----------------------------------------------------------------------------------------------------


def _storage(retriever: RetrieverConfig) -> "StorageContext":
    from llama_index.core import StorageContext

    return StorageContext.from_defaults(persist_dir=str(retriever.persist_dir))


def _index_struct(storage: "StorageContext", retriever: RetrieverConfig) -> Any:
    """The index struct `index_id` names, or the storage's only one: a VectorStoreIndex's."""
    from llama_index.core.data_structs.data_structs import IndexDict
    structs = {struct.index_id: struct for struct in storage.index_store.index_structs()}
    if retriever.index_id is not None and retriever.index_id not in structs:
        raise RetrieverError(f"retriever.index_id: no index `{retriever.index_id}` in {retriever.persist_dir} "
                             f"(it holds {', '.join(sorted(structs)) or 'none'}).")
    if retriever.index_id is None and len(structs) != 1:
        raise RetrieverError(f"retriever.persist_dir: {retriever.persist_dir} holds {len(structs)} indexes "
                             f"({', '.join(sorted(structs))}): set retriever.index_id to the one to retrieve through.")
    struct = structs[retriever.index_id] if retriever.index_id is not None else next(iter(structs.values()))
    if not isinstance(struct, IndexDict):
        raise RetrieverError(f"retriever.persist_dir: {retriever.describe()} is not a VectorStoreIndex (its struct "
                             f"is {type(struct).__name__}); ragtune retrieves through one. Set retriever.index_id to "
                             "a VectorStoreIndex of the storage.")
    return struct


def _qdrant_store(retriever: RetrieverConfig) -> "QdrantVectorStore":
    try:
        from llama_index.vector_stores.qdrant import QdrantVectorStore
    except ImportError:
        raise RetrieverError(f"retriever.vector_store: qdrant needs LlamaIndex's Qdrant integration: {QDRANT_EXTRA}."
                             ) from None
    client = _qdrant_client(str(retriever.path) if retriever.path else None, retriever.url, retriever.api_key_env)
    if not client.collection_exists(retriever.collection_name):
        names = sorted(c.name for c in client.get_collections().collections)
        raise RetrieverError(f"retriever.collection_name: no collection `{retriever.collection_name}` at "
                             f"{retriever.path or retriever.url} (it holds {', '.join(names) or 'none'}).")
    return QdrantVectorStore(client=client, collection_name=retriever.collection_name)


@lru_cache(maxsize=None)
def _qdrant_client(path: str | None, url: str | None, api_key_env: str | None) -> Any:
    """One client per store and process: Qdrant's local mode locks its folder against a second client."""
    import os

    from qdrant_client import QdrantClient

    if path is not None:
        return QdrantClient(path=path)
    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise RetrieverError(f"retriever.api_key_env: the environment variable {api_key_env} is not set.")
    return QdrantClient(url=url, api_key=api_key)


def _qdrant_dimension(store: "QdrantVectorStore") -> int | None:
    vectors = store.client.get_collection(store.collection_name).config.params.vectors
    params = vectors.get(store.dense_vector_name) if isinstance(vectors, dict) else vectors
    return getattr(params, "size", None)


def _check_dimension(dimension: int | None, embed_model: "BaseEmbedding", retriever: RetrieverConfig) -> None:
    """A query embedded by another model than the index's finds nothing it should: fail where the sizes differ."""
    if dimension is None:
        return
    query = len(embed_model.get_query_embedding("dimension probe"))
    if query != dimension:
        raise RetrieverError(f"embedding.model gives {query}-dimensional vectors but {retriever.describe()} holds "
                             f"{dimension}-dimensional ones: set embedding.model to the model the index was built "
                             "with.")

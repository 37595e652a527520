"""Prep's steps 1-2 from the user's own LlamaIndex index (`retriever:`): its nodes are the chunks, it retrieves.

Instead of reading `documents:` and building an index, prep writes the index's nodes to data/chunks.jsonl (ids and
text as stored, so every context eval and serve retrieve is a chunk prep knows) and records the index for eval and
serve (`ragtune.core.retriever.record`). The held-out split needs each node's source: the `file_path`/`file_name`
and `page_label` LlamaIndex's readers (SimpleDirectoryReader, PDFReader) write, or ragtune's own `document`/`page`.
A node without a page is split with its whole document; a node without a source stops prep with `NodeMetadataError`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragtune.core.artifacts import read_jsonl, write_jsonl
from ragtune.core.errors import UserFacingError
from ragtune.core.retriever import RETRIEVER_FILE, content_fingerprint, open_index, record, stored_nodes
from ragtune.core.run_dir import RunDir, short_hash
from ragtune.data_prep.state import StepState

if TYPE_CHECKING:
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import BaseNode

    from ragtune.app.config import RagtuneConfig
    from ragtune.core.retriever import RetrieverConfig

log = logging.getLogger(__name__)

SOURCE_KEYS = ("document", "file_path", "file_name")  # ragtune's chunks, then what LlamaIndex's readers write
PAGE_KEYS = ("page", "page_label")


class NodeMetadataError(UserFacingError):
    """Nodes of the user's index lack the source metadata the held-out split needs; says which and how to add it."""


def index_chunks(config: "RagtuneConfig", run_dir: RunDir, state: StepState
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The index's nodes as data/chunks.jsonl rows; return them and their facts. The step's fingerprint is the
    index's content, so a re-indexed corpus redoes prep from its questions on."""
    retriever = config.retriever
    nodes = stored_nodes(retriever)
    fingerprint = short_hash(retriever.model_dump(mode="json"), content_fingerprint(nodes))
    if state.is_done("chunks", fingerprint, run_dir.chunks):
        return read_jsonl(run_dir.chunks), state.facts("chunks")
    state.start("chunks", fingerprint, [run_dir.chunks])
    chunks, warnings = node_chunks(nodes, retriever)
    write_jsonl(run_dir.chunks, chunks)
    facts = {"retriever": retriever.describe(), "documents": len({c["metadata"]["document"] for c in chunks}),
             "pages": len({(c["metadata"]["document"], c["metadata"]["page"]) for c in chunks}),
             "chunks": len(chunks), "document_warnings": warnings}
    state.finish("chunks", **facts)
    return chunks, facts


def node_chunks(nodes: list["BaseNode"], retriever: "RetrieverConfig") -> tuple[list[dict[str, Any]], list[str]]:
    """Chunk rows (`id`, `text`, `metadata` with ragtune's `document`, `file` and `page` beside the node's own keys)
    and the warnings about them; raise NodeMetadataError when a node's source document is unknown."""
    chunks: list[dict[str, Any]] = []
    unsourced: list[str] = []
    blank = 0
    for node in nodes:
        text = node.get_content()
        source = _first(node.metadata, SOURCE_KEYS)
        if source is None:
            unsourced.append(node.node_id)
        elif not text.strip():
            blank += 1  # nothing to ask a question about
        else:
            file = _first(node.metadata, ("file_name", "file")) or Path(str(source)).name
            chunks.append({"id": node.node_id, "text": text, "metadata": {
                **node.metadata, "document": str(source), "file": file, "page": _first(node.metadata, PAGE_KEYS)}})
    if unsourced:
        raise NodeMetadataError(
            f"{len(unsourced)} of {len(nodes)} nodes of {retriever.describe()} have no source metadata (no "
            f"`file_path` or `file_name`, e.g. node {unsourced[0]}): prep splits the held-out questions by source "
            "document and page so that no eval page is ever trained on. Re-index with SimpleDirectoryReader (it writes "
            "file_path, file_name and, for PDFs, page_label), or set `file_name` (and `page_label`) in each "
            "Document's metadata before indexing.")
    if not chunks:
        raise NodeMetadataError(f"{retriever.describe()} holds no node with text: point `retriever:` at the index "
                                "your RAG pipeline retrieves from.")
    warnings = []
    pageless = sum(1 for c in chunks if c["metadata"]["page"] is None)
    if pageless:
        warnings.append(f"{pageless} of {len(chunks)} nodes have no `page_label`: the held-out split keeps each of "
                        "their documents whole")
    if blank:
        warnings.append(f"{blank} nodes without text left out")
    for warning in warnings:
        log.warning("%s", warning)
    return chunks, warnings


def own_index(config: "RagtuneConfig", run_dir: RunDir, state: StepState, embed_model: Any) -> "VectorStoreIndex":
    """The user's index, opened with the configured embedding model and recorded in data/index/ for eval and serve."""
    index = open_index(config.retriever, embed_model)
    fingerprint = short_hash(state.fingerprint("chunks"), config.embedding.model)
    if not state.is_done("index", fingerprint, run_dir.index / RETRIEVER_FILE):
        state.start("index", fingerprint, [run_dir.index])
        record(run_dir.index, config.retriever, config.embedding.model, state.fingerprint("chunks"))
        state.finish("index")
    return index


def _first(metadata: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The value of the first of `keys` the metadata holds (not empty)."""
    return next((metadata[key] for key in keys if metadata.get(key) not in (None, "")), None)

"""Bring your own index (`retriever:`): prep and eval from a persisted LlamaIndex index and from a Qdrant collection
(local mode, in-process), both built the way a LlamaIndex user builds them: SimpleDirectoryReader, SentenceSplitter,
VectorStoreIndex over the packaged MiniLM."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from ragtune.app.config import ConfigError, load_config
from ragtune.core.artifacts import read_jsonl
from ragtune.core.rag import embedding_model, load_index, retrieve
from ragtune.core.retriever import RetrieverConfig, RetrieverError, open_index, store_fingerprint, stored_nodes
from ragtune.core.roles import EmbeddingConfig
from ragtune.core.run_dir import RunDir
from ragtune.data_prep.own_index import NodeMetadataError
from ragtune.data_prep.prep import make_chunks, region_of, run, split_regions
from ragtune.data_prep.state import StepState

pytest.importorskip("llama_index.vector_stores.qdrant", reason="`pip install -e '.[test]'` installs it")

COLLECTION = "uber"


@pytest.fixture(scope="module")
def embed_model() -> Any:
    return embedding_model(EmbeddingConfig())


@pytest.fixture(scope="module")
def user_nodes(excerpt_pdf: Path, embed_model: Any) -> list[Any]:
    """The excerpt's pages as LlamaIndex's readers give them (file_path, file_name, page_label), split and embedded
    once: both indexes below hold these very nodes."""
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import MetadataMode

    documents = SimpleDirectoryReader(input_files=[str(excerpt_pdf)]).load_data()
    nodes = SentenceSplitter(chunk_size=512, chunk_overlap=32).get_nodes_from_documents(documents)
    vectors = embed_model.get_text_embedding_batch([n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes])
    for node, vector in zip(nodes, vectors):
        node.embedding = vector
    return nodes


@pytest.fixture(scope="module")
def persist_dir(tmp_path_factory: pytest.TempPathFactory, user_nodes: list[Any], embed_model: Any) -> Path:
    """`index.storage_context.persist(persist_dir=...)` of a VectorStoreIndex over the nodes."""
    from llama_index.core import VectorStoreIndex

    folder = tmp_path_factory.mktemp("storage")
    VectorStoreIndex(user_nodes, embed_model=embed_model).storage_context.persist(persist_dir=str(folder))
    return folder


def qdrant_collection(folder: Path, nodes: list[Any], embed_model: Any) -> Path:
    """The nodes in a Qdrant collection at `folder` (local mode), through LlamaIndex's QdrantVectorStore; the
    client is closed after, as the user's process would be, so ragtune can open the folder."""
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    client = QdrantClient(path=str(folder))
    store = QdrantVectorStore(client=client, collection_name=COLLECTION)
    VectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(vector_store=store), embed_model=embed_model)
    client.close()
    return folder


@pytest.fixture(scope="module")
def qdrant_path(tmp_path_factory: pytest.TempPathFactory, user_nodes: list[Any], embed_model: Any) -> Path:
    return qdrant_collection(tmp_path_factory.mktemp("qdrant"), user_nodes, embed_model)


@pytest.fixture(scope="module")
def retrievers(persist_dir: Path, qdrant_path: Path) -> dict[str, dict[str, Any]]:
    """The `retriever:` section for each index."""
    return {"persisted": {"persist_dir": str(persist_dir)},
            "qdrant": {"vector_store": "qdrant", "path": str(qdrant_path), "collection_name": COLLECTION}}


def own_index_config(folder: Path, retriever: dict[str, Any], smollm2: Path | str = "smollm2-135m-instruct",
                     **data_prep: Any) -> Path:
    """A config with `retriever:` instead of `documents:` (SmolLM2 teaches; its questions and answers unchecked, so
    that prep asks the teacher as few times as it can)."""
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({
        "name": "own-index", "output_dir": str(folder / "run"), "retriever": retriever,
        "embedding": {"model": "all-minilm-l6-v2"},
        "teacher": {"backend": "hf", "model": str(smollm2), "max_new_tokens": 32, "batch_size": 4},
        "student": {"model": str(smollm2)}, "judge": {"model": str(smollm2)},
        "data_prep": {"num_train_questions": 2, "num_eval_questions": 1, "answerable_check": "none",
                      "answer_gates": {"enabled": False}, **data_prep},
    }), encoding="utf-8")
    return path


# --- the parts, on both indexes --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["persisted", "qdrant"])
def test_chunks_are_the_indexs_nodes_split_by_their_pages(kind: str, retrievers: dict[str, dict[str, Any]],
                                                          user_nodes: list[Any], tmp_path: Path) -> None:
    config = load_config(own_index_config(tmp_path, retrievers[kind]))
    run_dir = RunDir(config.output_dir)
    run_dir.data.mkdir(parents=True)
    chunks, facts = make_chunks(config, run_dir, StepState(run_dir))

    assert {c["id"]: c["text"] for c in chunks} == {n.node_id: n.get_content() for n in user_nodes}
    assert facts["chunks"] == len(user_nodes) and facts["pages"] == 8 and facts["documents"] == 1
    assert facts["retriever"] == config.retriever.describe()
    labels = {n.node_id: n.metadata["page_label"] for n in user_nodes}
    assert all(c["metadata"]["page"] == labels[c["id"]] and c["metadata"]["file"] == "uber_10k_excerpt.pdf"
               for c in chunks)
    split = split_regions(chunks, config.data_prep, config.seed)
    assert len(split["train"]) + len(split["eval"]) == 8 and not split["train"] & split["eval"]
    pages = {s: {labels[c["id"]] for c in chunks if region_of(c, "page") in split[s]} for s in ("train", "eval")}
    assert pages["train"] and pages["eval"] and not pages["train"] & pages["eval"]
    assert StepState(run_dir).fingerprint("chunks") and make_chunks(config, run_dir, StepState(run_dir))[0] == chunks


@pytest.mark.parametrize("kind", ["persisted", "qdrant"])
def test_retrieval_goes_through_the_users_index(kind: str, retrievers: dict[str, dict[str, Any]],
                                                user_nodes: list[Any], embed_model: Any) -> None:
    index = open_index(RetrieverConfig.model_validate(retrievers[kind]), embed_model)
    probe, others = user_nodes[5], [user_nodes[1].node_id, user_nodes[2].node_id]
    assert retrieve(index, [probe.get_content()], 2)[0][0]["id"] == probe.node_id
    restricted = retrieve(index, [probe.get_content()], 2, node_ids=others)[0]  # prep's train-region search
    assert sorted(h["id"] for h in restricted) == sorted(others)


@pytest.mark.parametrize("kind", ["persisted", "qdrant"])
def test_dry_run_opens_the_users_index(kind: str, retrievers: dict[str, dict[str, Any]], user_nodes: list[Any],
                                       tmp_path: Path) -> None:
    from ragtune.app.dry_run import _retriever_check

    config = load_config(own_index_config(tmp_path, retrievers[kind]))
    assert _retriever_check(config) == ("ok", f"retriever: {config.retriever.describe()}, {len(user_nodes)} nodes")


def test_a_changed_index_changes_the_prep_fingerprint(persist_dir: Path, embed_model: Any, tmp_path: Path) -> None:
    """The pipeline's prep inputs hash the index's nodes as they hash documents: a re-indexed corpus re-runs prep."""
    from llama_index.core import StorageContext, load_index_from_storage
    from llama_index.core.schema import TextNode

    from ragtune.app.pipeline import input_hashes

    copy = shutil.copytree(persist_dir, tmp_path / "storage")
    config = load_config(own_index_config(tmp_path, {"persist_dir": str(copy)}))
    before = input_hashes(config)
    assert set(before) == {"retriever"} and before["retriever"] == store_fingerprint(config.retriever)
    index = load_index_from_storage(StorageContext.from_defaults(persist_dir=str(copy)), embed_model=embed_model)
    index.insert_nodes([TextNode(text="Uber was founded in 2009.", metadata={"file_name": "new.md"})])
    index.storage_context.persist(persist_dir=str(copy))
    assert input_hashes(config)["retriever"] != before["retriever"]


def test_nodes_without_source_metadata_stop_prep_with_one_clear_error(tmp_path: Path, embed_model: Any) -> None:
    from llama_index.core import MockEmbedding
    from llama_index.core.schema import TextNode

    nodes = [TextNode(text=text, embedding=[float(i), 1.0, 0.0, 0.5]) for i, text in enumerate(
        ["Uber's Mobility segment connects riders and drivers.", "Freight connects carriers with shippers."])]
    folder = qdrant_collection(tmp_path / "bare", nodes, MockEmbedding(embed_dim=4))
    retriever = {"vector_store": "qdrant", "path": str(folder), "collection_name": COLLECTION}
    config = load_config(own_index_config(tmp_path, retriever))
    run_dir = RunDir(config.output_dir)
    run_dir.data.mkdir(parents=True)
    with pytest.raises(NodeMetadataError) as err:
        make_chunks(config, run_dir, StepState(run_dir))
    message = str(err.value)
    assert message.startswith(f"2 of 2 nodes of qdrant collection `{COLLECTION}` at {folder} have no source metadata")
    assert "`file_path` or `file_name`" in message and "page_label" in message
    assert any(f"e.g. node {node.node_id}" in message for node in nodes)
    with pytest.raises(RetrieverError, match="gives 384-dimensional vectors but .* holds 4-dimensional ones"):
        open_index(config.retriever, embed_model)  # MiniLM's queries against another model's vectors


def test_a_storage_without_a_vector_store_index_is_named(tmp_path: Path) -> None:
    from llama_index.core import SummaryIndex
    from llama_index.core.schema import TextNode

    SummaryIndex([TextNode(text="Uber was founded in 2009.")]).storage_context.persist(persist_dir=str(tmp_path))
    with pytest.raises(RetrieverError, match="is not a VectorStoreIndex .*Set retriever.index_id"):
        stored_nodes(RetrieverConfig(persist_dir=tmp_path))


@pytest.mark.parametrize("edit, expected", [
    (lambda c, r: {**c, "documents": ["x.pdf"]}, ["documents: prep takes its nodes from `retriever:`"]),
    (lambda c, r: {k: v for k, v in c.items() if k != "embedding"}, ["embedding: `retriever:` needs `embedding"]),
    (lambda c, r: {k: v for k, v in c.items() if k != "retriever"}, ["documents: required key is missing"]),
    (lambda c, r: {**c, "retriever": {"persist_dir": str(r)}}, ["retriever", "no persisted LlamaIndex index"]),
    (lambda c, r: {**c, "retriever": {"vector_store": "qdrant", "path": str(r)}}, ["needs `collection_name`"]),
    (lambda c, r: {**c, "retriever": {"vector_store": "chroma"}}, ["retriever.vector_store", "'qdrant'"]),
    (lambda c, r: {**c, "retriever": {**c["retriever"], "collection_name": "x"}}, ["`collection_name` is a"]),
])
def test_bad_retriever_config_names_the_key(edit: Callable[..., dict[str, Any]], expected: list[str],
                                            persist_dir: Path, tmp_path: Path) -> None:
    path = own_index_config(tmp_path, {"persist_dir": str(persist_dir)})
    path.write_text(yaml.safe_dump(edit(yaml.safe_load(path.read_text()), tmp_path)), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and all(fragment in str(err.value) for fragment in expected)


# --- prep, then eval's retrieval, from each index ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["persisted", "qdrant"])
def test_prep_and_eval_retrieve_through_the_users_index(kind: str, retrievers: dict[str, dict[str, Any]],
                                                        user_nodes: list[Any], smollm2_dir: Path,
                                                        tmp_path: Path) -> None:
    from ragtune.eval.answer import load_questions, retrieve_contexts

    config = load_config(own_index_config(tmp_path, retrievers[kind], smollm2_dir))
    run_dir = RunDir(config.output_dir)
    facts = run(config, run_dir)
    text = {n.node_id: n.get_content() for n in user_nodes}
    page = {n.node_id: n.metadata["page_label"] for n in user_nodes}
    assert not (run_dir.index / "docstore.json").exists()  # no index of ragtune's own: the user's was used
    assert facts["chunks"] == len(user_nodes) and facts["answers_kept"] >= 1

    chunks = {c["id"]: c for c in read_jsonl(run_dir.chunks)}
    split = split_regions(list(chunks.values()), config.data_prep, config.seed)  # by the nodes' page_label
    train_q, eval_q = read_jsonl(run_dir.questions_train), read_jsonl(run_dir.questions_eval)
    assert train_q and eval_q and not {page[q["source_chunk_id"]] for q in train_q} & {
        page[q["source_chunk_id"]] for q in eval_q}
    for row in read_jsonl(run_dir.train_jsonl):  # the teacher's contexts are the user's nodes, of training pages only
        ids = row["meta"]["retrieved_ids"]
        assert ids and all(region_of(chunks[i], "page") in split["train"] for i in ids)
        assert all(text[i] in row["messages"][1]["content"] for i in ids)

    questions, _ = load_questions(run_dir)
    retrieval = retrieve_contexts(config, run_dir, questions)
    for question in questions:
        found = retrieval[question["id"]]
        assert len(found["context_ids"]) == config.data_prep.similarity_top_k
        assert found["contexts"] == [text[i] for i in found["context_ids"]]
    served = retrieve(load_index(config.embedding, run_dir.index), [questions[0]["question"]], 2)[0]  # serve's path
    assert [h["id"] for h in served] == retrieval[questions[0]["id"]]["context_ids"]

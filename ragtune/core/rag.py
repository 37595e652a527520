"""The RAG pipeline every stage shares: the persisted LlamaIndex index, retrieval, and the prompt.

prep builds the index and trains on `build_rag_messages`; eval and serve call `load_index`, `retrieve`
and the same `build_rag_messages`, so the student is scored on exactly the retrieval and prompt it
was trained on. LlamaIndex is always given the embedding model explicitly and no LLM, so it never
falls back to its OpenAI defaults.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ragtune.core.artifacts import tmp_path
from ragtune.core.errors import UserFacingError
from ragtune.core.grounding import first_sentences, repetition
from ragtune.core.llm import Completion

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
    """The configured sentence-transformers model as a LlamaIndex embedding (CPU/GPU picked by torch)."""
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from ragtune.core.models import resolve_embedding

    return HuggingFaceEmbedding(model_name=resolve_embedding(embedding.model), embed_batch_size=embedding.embed_batch_size)


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
    """Reload the index prep persisted in `index_dir`, with the configured embedding model."""
    from llama_index.core import Settings, StorageContext, load_index_from_storage
    from llama_index.core.llms import MockLLM

    if not (index_dir / "docstore.json").exists():
        raise IndexNotFound(f"{index_dir}: no persisted index. Run `ragtune prep CONFIG` first.")
    Settings.llm = MockLLM()
    storage = StorageContext.from_defaults(persist_dir=str(index_dir))
    return load_index_from_storage(storage, embed_model=embed_model or embedding_model(embedding))


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


# --- the teacher's view: what prep's teacher was told, so eval's references come from the same teacher ------------


class TeacherStyle(Protocol):
    """The `data_prep` keys that shape how the teacher answers (sent to the teacher only, never saved in a row)."""

    teacher_instruction: str | None
    teacher_max_sentences: int | None
    teacher_answer: str
    raft: Any
    answer_gates: Any


def teacher_extra(prep: TeacherStyle) -> str:
    """What is appended to the teacher's last message: `teacher_instruction` and, in RAFT CoT mode, the
    chain-of-thought instruction."""
    return (prep.teacher_instruction or "") + (prep.raft.chain_of_thought_instruction
                                               if prep.raft.enabled and prep.raft.chain_of_thought else "")


def teacher_view(messages: list[dict[str, str]], prep: TeacherStyle) -> list[dict[str, str]]:
    """What the teacher is sent: the training messages plus `teacher_extra`. The saved row keeps the plain
    messages, the ones eval sends: the student learns the instructed behaviour without the instruction (context
    distillation)."""
    extra = teacher_extra(prep)
    if not extra:
        return messages
    return messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + extra}]


def teacher_stop_when(prep: TeacherStyle, loops: bool = False) -> Callable[[str], bool] | None:
    """Where the teacher stops early: at a loop when `loops` (the answer gates reject it anyway; not at
    max_new_tokens as "truncated"), and after `teacher_max_sentences` complete sentences."""
    cap = prep.teacher_max_sentences
    if not loops and cap is None:
        return None
    return lambda text: (loops and repetition(text) is not None) or (cap is not None and
                                                                     first_sentences(text, cap) is not None)


def cut_sentences(completion: Any, prep: TeacherStyle) -> Any:
    """A completion stopped after `teacher_max_sentences` keeps those sentences, not the next one's first word."""
    cap = prep.teacher_max_sentences
    if cap is None or completion.text is None or completion.finish_reason != "stop":
        return completion
    head = first_sentences(completion.text, cap)
    return completion if head is None else replace(completion, text=head)


def ask_teacher(backend: Any, views: list[list[dict[str, str]]], prep: TeacherStyle, *, loops: bool = False,
                **chat_kwargs: Any) -> list[Any]:
    """`backend.chat` on teacher views, stopped (`teacher_stop_when`) and cut (`cut_sentences`) as prep's teacher is:
    one call for prep's answers and eval's references."""
    completions = backend.chat(views, stop_when=teacher_stop_when(prep, loops), **chat_kwargs)
    return [cut_sentences(c, prep) for c in completions]


def teacher_candidates(backend: Any, views: list[list[dict[str, str]]], prep: TeacherStyle, role: Any,
                       top_logprobs: int | None = None, contexts: list[list[str]] | None = None) -> list[list[Any]]:
    """Per view, the teacher's best-of-N candidates as prep draws them: the answer at `role.temperature`, then
    `role.num_candidates - 1` samples at `role.candidate_temperature` (sent after the greedy batch: on vLLM their
    prompts are prefix-cache hits), and, with the answer gates on, a longer second try of the first answer when
    every candidate was cut at max_new_tokens. Prep gates them into training rows; eval into its references.
    `top_logprobs=k` (soft-label distillation) asks every call for the teacher's top-k log-probs per token.
    With `teacher_answer: extract`, each candidate is one sentence of the view's `contexts` (`extract_answers`)."""
    gates = prep.answer_gates
    logprobs = {"top_logprobs": top_logprobs} if top_logprobs else {}
    if prep.teacher_answer == "extract" and contexts is None:
        raise ValueError("teacher_answer: extract needs the contexts of every view")

    def ask(temperature: float, repeat: int = 1) -> list[Any]:
        """Every view `repeat` times in a row, answered as `teacher_answer` says."""
        asked = [v for v in views for _ in range(repeat)]
        if prep.teacher_answer == "extract":
            return extract_answers(backend, asked, [c for c in contexts for _ in range(repeat)], role.max_new_tokens,
                                   temperature=temperature)
        return ask_teacher(backend, asked, prep, loops=gates.enabled, temperature=temperature, **logprobs)

    per_view = [[answer] for answer in ask(role.temperature)]
    extra = role.num_candidates - 1
    if extra > 0:
        samples = ask(role.candidate_temperature, repeat=extra)
        for k, candidates in enumerate(per_view):
            candidates.extend(samples[k * extra : (k + 1) * extra])
    retry = [k for k, cands in enumerate(per_view) if gates.enabled and prep.teacher_answer == "generate"
             and all(c.finish_reason == "length" for c in cands)]
    if retry:
        again = ask_teacher(backend, [views[k] for k in retry], prep, loops=gates.enabled, temperature=role.temperature,
                            max_new_tokens=gates.retry_max_new_tokens or 2 * role.max_new_tokens, **logprobs)
        for k, answer in zip(retry, again):
            per_view[k][0] = answer
    return per_view


# --- the extractive teacher: one sentence of the contexts, chosen by the model ---------------------------------------

# A sentence worth answering with has this many words at least: shorter pieces of a filing are headings and table
# cells ("Item 1A.", "2022 $ 280 $ 140"), which the probe on the demo's questions saw chosen when they were allowed.
MIN_SENTENCE_WORDS = 4
# A complete sentence starts with a capital letter (an opening quote allowed) and ends with ., ! or ? (closing quotes
# or brackets allowed): a chunk's first and last pieces, cut mid-sentence by the splitter, are not answers. Not a
# digit: in a demo run the teacher chose "000 units of such currency and ..." (a chunk cut inside "100,000").
COMPLETE_SENTENCE = re.compile(r"""^["'“‘(]?[A-Z].*[.!?]["'”’)]?$""", re.DOTALL)
# List markers before an item ("• ", "(e) ", "(ii) ", "(1) ", "(e) (d) "): the item itself may be a complete sentence.
# In a demo run 14 of the 28 pieces of the 8 eval contexts that offered no sentence were such items, as were most
# sentences of the credit agreement's sections.
LIST_MARKER = re.compile(r"^(?:(?:[•●▪◦*–-]|\((?:[a-z]{1,2}|[ivx]{1,5}|\d{1,2})\))\s+)+")


@lru_cache(maxsize=1)
def _sentence_tokenizer() -> Callable[[str], list[str]]:
    from llama_index.core.node_parser.text.utils import split_by_sentence_tokenizer

    return split_by_sentence_tokenizer()


def context_sentences(contexts: list[str], max_chars: int) -> list[str]:
    """The complete sentences of the contexts (LlamaIndex's sentence tokenizer, NLTK punkt, per paragraph), in
    order, whitespace collapsed, without repeats: the answers an extractive teacher may choose from. Sentences
    longer than `max_chars` are left out (they would not fit the answer's token budget)."""
    split = _sentence_tokenizer()
    found: list[str] = []
    for context in contexts:
        for paragraph in re.split(r"\n\s*\n", context):
            for sentence in _joined(split(paragraph)):
                sentence = LIST_MARKER.sub("", sentence)
                if (len(sentence.split()) >= MIN_SENTENCE_WORDS and len(sentence) <= max_chars
                        and _mostly_words(sentence) and COMPLETE_SENTENCE.match(sentence) and sentence not in found):
                    found.append(sentence)
    return found


def _mostly_words(sentence: str) -> bool:
    """Whether most of its tokens hold a letter: a table row with a period at its end is not a sentence ("Effective
    income tax rate (0.5)% 2.8 % 48." was a training answer in a demo run); prose with figures keeps its words."""
    tokens = sentence.split()
    return sum(any(c.isalpha() for c in token) for token in tokens) > len(tokens) / 2


def _joined(pieces: list[str]) -> list[str]:
    """The tokenizer's pieces, whitespace collapsed, each piece that starts in lower case joined to the one before:
    punkt ends a sentence at some abbreviations ("… commercial paper, U.S." | "government and agency securities …"
    in a demo reference), and a sentence never starts in lower case. A paragraph's first piece stays apart (a
    chunk cut mid-sentence)."""
    joined: list[str] = []
    for piece in (" ".join(p.split()) for p in pieces):
        if joined and piece[:1].islower():
            joined[-1] += " " + piece
        elif piece:
            joined.append(piece)
    return joined


def sentence_schema(sentences: list[str]) -> dict[str, Any]:
    """A JSON schema whose only valid answers are `{"answer": <one of the sentences>}`: vLLM's structured outputs
    (and xgrammar on the hf backend) make the model choose one, verbatim, by decoding under the constraint."""
    return {"title": "sentence", "type": "object", "properties": {"answer": {"type": "string", "enum": sentences}},
            "required": ["answer"], "additionalProperties": False}


def extract_answers(backend: Any, views: list[list[dict[str, str]]], contexts: list[list[str]], max_new_tokens: int,
                    temperature: float) -> list[Any]:
    """Per view, the teacher's choice of one complete sentence of its contexts, as a Completion whose text is the
    sentence (empty where the contexts hold none: the answer gates reject it as "empty").

    Why: a 135M teacher writing freely invents (88 of 160 demo answers failed the grounding gate at best-of-6),
    while choosing among the contexts' sentences it is grounded by construction and is left only the choice, which
    the answer gates still check (on topic, not a restatement of the question). Sentences are kept up to 3
    characters per token of `max_new_tokens` (SmolLM2's tokenizer averages 4.75 characters per token on a 10-K,
    2.7 on its densest 5 %). The call's budget is a token per character of the longest as JSON writes it (curly
    quotes as \\u201c): a token is at least one character of ASCII, so a chosen sentence is never cut, and the
    grammar ends the answer with the sentence whatever the budget. Half a token per character cut 2 of 160."""
    options = [context_sentences(c, 3 * max_new_tokens) for c in contexts]
    asked = [k for k, sentences in enumerate(options) if sentences]
    answers: list[Any] = [Completion("", None, 0, 0, "stop") for _ in views]
    if not asked:
        return answers
    budget = max(len(json.dumps(s)) for k in asked for s in options[k]) + len('{"answer":}')
    chosen = backend.chat([views[k] for k in asked], json_schema=[sentence_schema(options[k]) for k in asked],
                          max_new_tokens=budget, temperature=temperature)
    for k, completion in zip(asked, chosen):
        if completion.text is not None:
            completion = replace(completion, text=json.loads(completion.text)["answer"])
        answers[k] = completion
    return answers

"""`data_prep.teacher_answer: extract`: the teacher answers with one sentence of its contexts, chosen by the model
under a JSON schema that allows only those sentences (per conversation), on the embedded SmolLM2 and a real prep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ragtune.app.config import load_config
from ragtune.core.artifacts import read_jsonl
from ragtune.core.errors import UserFacingError
from ragtune.core.gates import check_answer
from ragtune.core.llm import HFChatBackend
from ragtune.core.rag import build_rag_messages
from ragtune.core.teacher import (
    CHOICE_TOKENS, chosen_sentence, context_sentences, extract_answers, sentence_schema, teacher_candidates, teacher_view,
)

# Real chunks of Uber's 2021 10-K as the demo's 128-token splitter cut them: a bullet list cut mid-item, a chunk that
# starts mid-sentence, a definition, a table row.
RISKS = ("such as the current COVID-19 pandemic, natural disasters, or responses to these events.\n\nIn addition, price "
         "and volume fluctuations in the stock markets have affected and continue to affect many technology "
         "companies’ stock prices. Often, their stock prices have fluctuated in ways unrelated or disproportionate to "
         "the companies’ operating performance. In the past, stockholders have filed securities class action "
         "litigation following periods of market volatility.")
BULLETS = ("• any major change in our board of directors or management;\n\n• any safety incidents or public reports of "
           "safety incidents that occur on our platform or in our industry;\n\n• statements, commentary, or opinions by "
           "public officials that our product offerings are or may be unlawful, regardless of any interim or final "
           "rulings by judicial or regulatory bodies; and\n\n• other events or factors, including those resulting from "
           "war, incidents of terrorism, natural disasters, public health concerns or epidemics, such a")
DEFINITION = ("“GAAP” means generally accepted accounting principles in the United States of America. “Governmental "
              "Authority” means the government of the United States of America, any other nation or any political "
              "subdivision thereof")
TABLE = "2022 $ 280 $ 140\n\n2023 245 120\n\nItem 1A."
TAKE_RATE = ("Take Rate is defined as revenue as a percentage of Gross Bookings. We use Take Rate to measure the share of "
             "Gross Bookings that we earn as revenue. Gross Bookings grew 56% year over year.")

INSTRUCTION = "\n\nAnswer with the one sentence of the context that answers the query, copied word for word."


def test_context_sentences_are_the_complete_sentences_of_the_contexts() -> None:
    sentences = context_sentences([RISKS, BULLETS, DEFINITION, TABLE, RISKS], max_chars=300)
    assert sentences == [
        "In addition, price and volume fluctuations in the stock markets have affected and continue to affect many "
        "technology companies’ stock prices.",
        "Often, their stock prices have fluctuated in ways unrelated or disproportionate to the companies’ operating "
        "performance.",
        "In the past, stockholders have filed securities class action litigation following periods of market "
        "volatility.",
        "“GAAP” means generally accepted accounting principles in the United States of America.",
    ]  # a chunk's cut ends, bullet items, table cells, headings and repeats are not answers
    assert context_sentences([RISKS], max_chars=115) == [
        "In the past, stockholders have filed securities class action litigation following periods of market "
        "volatility."]
    assert context_sentences([TABLE, BULLETS], max_chars=300) == []


def test_headings_names_and_capitalised_clauses_are_not_sentences() -> None:
    """Lines of Uber's 10-K that end with a period but have no word in lower case beyond a title's small words; a
    sentence of capitalised names still has its verb in lower case."""
    lines = ["Section 2.17 Defaulting Lenders.", "Morgan Stanley Senior Funding, Inc.",
             "INCLUDING FEDERAL AND STATE SECURITIES LAWS.", "Section 9.18 Acknowledgement and Consent to Bail-In of "
             "EEA Financial Institutions.", "“Citigroup” means Citigroup Global Markets Inc."]
    assert context_sentences(["\n\n".join(lines)], max_chars=300) == ["“Citigroup” means Citigroup Global Markets Inc."]


def test_list_items_and_abbreviations_keep_their_sentences_whole() -> None:
    """A list marker is not part of the item's sentence, and punkt's split after "U.S." is not a sentence end (both
    are real 10-K text from eval contexts that offered no sentence, or half of one, in a demo run)."""
    cash = ("Cash and cash equivalents consist of cash held in checking and savings accounts as well as investments in "
            "money market funds, commercial paper, U.S. government and agency securities, and corporate bonds.")
    items = ("(e) The Revolving Loans comprising each SIBOR Borrowing shall bear interest at SIBOR for the Interest "
             "Period in effect for such Borrowing plus the Applicable Rate.\n\n• The Transition RSU Award will fully "
             "vest on May 8, 2022 if the Non-Employee Director is in service on that date.\n\n(e) (d) Benchmark "
             "Unavailability Period.\n\n(ii) the Borrower shall pay such amounts;")
    assert context_sentences([cash, items], max_chars=300) == [
        cash,
        "The Revolving Loans comprising each SIBOR Borrowing shall bear interest at SIBOR for the Interest Period in "
        "effect for such Borrowing plus the Applicable Rate.",
        "The Transition RSU Award will fully vest on May 8, 2022 if the Non-Employee Director is in service on that "
        "date.",
    ]  # a heading after its markers is still a heading; an item that is a clause is still not a sentence
    assert context_sentences(["commercial paper, U.S. government and agency securities, and corporate bonds."], 300) == []
    revenue = "Revenue was $17.5 billion, up 57% year-over-year."
    assert context_sentences([f"Effective income tax rate (0.5)% 2.8 % 48.\n\n{revenue}"], 300) == [revenue]


def test_hf_backend_constrains_each_conversation_by_its_own_schema(smollm2_dir: Path) -> None:
    """One batch, a schema per row (xgrammar matcher per row): each answer is one of its own row's sentences, and
    the same as when the row is generated alone."""
    backend = HFChatBackend(str(smollm2_dir), batch_size=3, max_new_tokens=120)
    contexts = [[RISKS], [DEFINITION, TAKE_RATE], [TAKE_RATE]]
    questions = ["Why have stockholders filed class actions?", "What does GAAP mean?", "How is Take Rate defined?"]
    views = [build_rag_messages(q, c, _prep()) for q, c in zip(questions, contexts)]
    schemas = [sentence_schema(context_sentences(c, 300)) for c in contexts]
    together = backend.chat(views, json_schema=schemas)
    alone = [backend.chat([view], json_schema=schema)[0] for view, schema in zip(views, schemas)]
    for completion, single, context in zip(together, alone, contexts):
        assert completion.error is None and json.loads(completion.text)["answer"] in context_sentences(context, 300)
        assert completion.text == single.text
    assert {json.loads(c.text)["answer"] for c in together[1:]} != {json.loads(together[0].text)["answer"]}


def test_extractive_teacher_answers_with_a_sentence_of_its_own_contexts(smollm2_dir: Path) -> None:
    prep = _prep()
    role = _teacher_role(smollm2_dir)
    backend = HFChatBackend(str(smollm2_dir), batch_size=4, max_new_tokens=role.max_new_tokens)
    contexts = [[DEFINITION, RISKS], [TAKE_RATE, BULLETS], [TABLE, BULLETS]]
    questions = ["What does GAAP mean?", "How is Take Rate defined?", "What were the lease payments in 2022?"]
    views = [teacher_view(build_rag_messages(q, c, prep), prep) for q, c in zip(questions, contexts)]
    assert views[0][-1]["content"].endswith(INSTRUCTION)
    per_view = teacher_candidates(backend, views, prep, role, contexts=contexts)
    assert [len(candidates) for candidates in per_view] == [1, 1, 1]
    (gaap,), (take_rate,), (nothing,) = per_view
    for answer, context in ((gaap, contexts[0]), (take_rate, contexts[1])):  # which one is the 135M model's choice
        assert answer.text in context_sentences(context, 3 * role.max_new_tokens)
        assert answer.finish_reason == "stop" and answer.completion_tokens > 0
    # contexts without a complete sentence: nothing to choose, and the gates say so (no teacher call wasted on it)
    assert (nothing.text, nothing.error, nothing.completion_tokens) == ("", None, 0)
    assert check_answer(nothing.text, nothing.finish_reason, contexts[2]).reason == "empty"
    assert check_answer(gaap.text, gaap.finish_reason, contexts[0]).grounding == 1.0


def test_a_choice_is_read_off_its_first_tokens_as_the_full_decode_makes_it(smollm2_dir: Path) -> None:
    """Greedy: the sentence extract_answers reads off CHOICE_TOKENS tokens is the one the whole decode writes."""
    backend = HFChatBackend(str(smollm2_dir), batch_size=4, max_new_tokens=200)
    contexts = [[DEFINITION, RISKS], [TAKE_RATE, BULLETS], [RISKS, TAKE_RATE], [DEFINITION, TAKE_RATE]]
    questions = ["What does GAAP mean?", "How is Take Rate defined?", "Why did stock prices fluctuate?",
                 "What is Take Rate?"]
    views = [build_rag_messages(q, c, _prep()) for q, c in zip(questions, contexts)]
    early = extract_answers(backend, views, contexts, 128, temperature=0.0)
    schemas = [sentence_schema(context_sentences(c, 3 * 128)) for c in contexts]
    full = backend.chat(views, json_schema=schemas, max_new_tokens=200)
    assert [a.text for a in early] == [json.loads(f.text)["answer"] for f in full]
    assert all(a.finish_reason == "stop" and 0 < a.completion_tokens <= CHOICE_TOKENS for a in early)
    assert sum(a.completion_tokens for a in early) < sum(f.completion_tokens for f in full)


def test_chosen_sentence_of_a_cut_reply() -> None:
    sentences = ["Gross Bookings grew 56% year over year.", "Gross Bookings fell.", "“GAAP” means principles."]
    assert chosen_sentence('{"answer": "Gross Bookings g', sentences) == sentences[0]
    assert chosen_sentence('{"answer": "Gross Bookings ', sentences) is None  # two sentences start so
    assert chosen_sentence('{"answer": "\\u201cGA', sentences) == sentences[2]
    assert chosen_sentence('{"answer": "\\u20', sentences) is None  # a cut escape is left out: nothing chosen yet
    assert chosen_sentence('{"answer": "Gross Bookings fell."}', sentences) == sentences[1]
    assert chosen_sentence('{"answer": "Net', sentences) is None and chosen_sentence("", sentences) is None


def test_off_topic_gate_rejects_a_sentence_that_shares_no_word_with_the_question() -> None:
    """Real choices of the extractive SmolLM2 teacher on the demo's questions (2026-11-30): a grounded sentence
    about something else is off topic; the right one (0.25 of the question's words) passes; 0 turns the gate off."""
    question = "What is the purpose of the BBR Screen Rate?"
    wrong = "“Australian Dollars” means the lawful currency of Australia."
    verdict = check_answer(wrong, "stop", [wrong], question=question, min_question_overlap=0.1)
    assert (verdict.ok, verdict.reason, verdict.grounding) == (False, "off_topic", 1.0)
    assert "0.00 of the question's words" in verdict.detail
    assert check_answer(wrong, "stop", [wrong], question=question).ok  # off by default
    right = "“GAAP” means generally accepted accounting principles in the United States of America."
    assert check_answer(right, "stop", [DEFINITION], question='What is the purpose of the "GAAP" in the context of '
                        "financial statements?", min_question_overlap=0.1).ok


@pytest.mark.parametrize(("data_prep", "message"), [
    ({"raft": {"enabled": True, "chain_of_thought": True}}, "RAFT's chain of thought"),
    ({"teacher_top_logprobs": 5}, "teacher_top_logprobs"),
])
def test_extract_refuses_settings_it_cannot_honour(write_config, data_prep: dict[str, Any], message: str) -> None:
    path = write_config(data_prep={"teacher_answer": "extract", **data_prep})
    with pytest.raises(UserFacingError, match=message):
        load_config(path)


@pytest.mark.slow
def test_prep_with_the_extractive_teacher_trains_only_sentences_of_the_rows_contexts(prepped_config) -> None:
    """prep's answers step on a real prep (SmolLM2 the teacher, gates on): every kept row's answer is verbatim a
    complete sentence of the contexts in its own prompt, and every question is a kept row or a rejected one."""
    from ragtune.app.pipeline import RunOptions, run_pipeline

    path = prepped_config(data_prep={"chunk_size": 256, "chunk_overlap": 16, "num_train_questions": 6,
                                     "num_eval_questions": 3, "teacher_answer": "extract",
                                     "teacher_instruction": INSTRUCTION,
                                     "answer_gates": {"enabled": True, "min_question_overlap": 0.1}})
    config = load_config(path)
    run_pipeline(config, RunOptions(only="prep"))
    data = path.parent / "run" / "data"
    chunks = {c["id"]: c["text"] for c in read_jsonl(data / "chunks.jsonl")}
    rows, rejected = read_jsonl(data / "train.jsonl"), read_jsonl(data / "answers.rejected.jsonl")
    assert rows, [r["candidates"] for r in rejected]
    for row in rows:
        contexts = [chunks[i] for i in row["meta"]["retrieved_ids"]]
        assert all(context in row["messages"][1]["content"] for context in contexts)
        assert INSTRUCTION not in row["messages"][1]["content"]  # the student learns without the instruction
        assert row["messages"][-1]["content"] in context_sentences(contexts, 3 * config.teacher.max_new_tokens)
        assert row["meta"]["grounding"] == 1.0 and row["meta"]["finish_reason"] == "stop"
    assert {r["reason"] for r in rejected} <= {"empty", "off_topic", "ungrounded", "prompt_echo", "repetition"}
    questions = {q["id"] for q in read_jsonl(data / "questions.train.jsonl")}
    assert {r["meta"]["question_id"] for r in rows} | {r["question_id"] for r in rejected} == questions


def _prep() -> Any:
    from ragtune.data_prep.config import DataPrepConfig

    return DataPrepConfig(teacher_answer="extract", teacher_instruction=INSTRUCTION)


def _teacher_role(smollm2_dir: Path) -> Any:
    from ragtune.core.roles import TeacherRole

    return TeacherRole(backend="hf", model=str(smollm2_dir), max_new_tokens=96)


def test_best_of_n_prefers_the_grounded_sentence_most_on_topic() -> None:
    """Extracted sentences tie on grounding (1.0 each): best-of-N keeps the one about the question's words."""
    from ragtune.core.gates import pick_best

    question = "How is Take Rate defined?"
    sentences = ["We use Take Rate to measure the share of Gross Bookings that we earn as revenue.",
                 "Take Rate is defined as revenue as a percentage of Gross Bookings.",
                 "Gross Bookings grew 56% year over year."]
    verdicts = [check_answer(s, "stop", [TAKE_RATE], question=question, min_question_overlap=0.1) for s in sentences]
    assert [v.grounding for v in verdicts[:2]] == [1.0, 1.0]
    assert [v.ok for v in verdicts] == [True, True, False] and verdicts[2].reason == "off_topic"
    assert verdicts[1].on_topic > verdicts[0].on_topic
    assert pick_best(verdicts) == 1

"""The teacher-answer gates (ragtune/core/gates.py): hand-written cases from the 10-K's wording, then real answers
of the embedded teacher (SmolLM2-135M-Instruct) on real chunks of the excerpt."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any

import pytest
from ragtune.core import gates
from ragtune.core import grounding as words
from ragtune.core.gates import Verdict, check_answer

SEGMENTS = ("As of December 31, 2021, we had three operating segments: Mobility, Delivery and Freight. "
            "Mobility connects consumers with a wide range of transportation modalities, such as ridesharing.")
DRIVERS = "In 2021, 4.6 million Drivers and couriers earned $30.0 billion on our platform, in over 10,000 cities."
CONTEXTS = [SEGMENTS, DRIVERS]


# --- words and grounding --------------------------------------------------------------------------


def test_content_words_drop_stopwords_plurals_and_keep_numbers_exact() -> None:
    assert words.content_words("What are the three operating segments of Uber in 2021?") == [
        "three", "operating", "segment", "uber", "2021"]
    assert words.content_words("earned $30.0 billion, in 10,000 cities.") == ["earned", "30.0", "billion", "10,000", "citie"]
    assert words.content_words("Based on the context, it is.") == []


def test_lexical_overlap() -> None:
    assert words.lexical_overlap("What are the three operating segments?", SEGMENTS) == 1.0
    assert words.lexical_overlap("What is the context of the question?", SEGMENTS) == 0.0
    assert words.lexical_overlap("How many segments did Uber report in 2021?", SEGMENTS) == pytest.approx(2 / 5)


def test_grounding_scores_content_word_pairs_found_in_a_context() -> None:
    # pairs: uber-three (not in the context), three-operating, operating-segment, segment-mobility, ... (found)
    assert words.grounding("Uber had three operating segments: Mobility, Delivery and Freight.", CONTEXTS) == pytest.approx(5 / 6)
    assert words.grounding("The segments are Mobility, Delivery, and Freight.", CONTEXTS) == 1.0
    assert words.grounding("Drivers and couriers earned $30.0 billion in 2021.", CONTEXTS) == pytest.approx(4 / 5)
    # numbers match exactly: the wrong amount breaks both of its pairs
    assert words.grounding("Drivers earned $30.0 billion.", CONTEXTS) == pytest.approx(2 / 3)
    assert words.grounding("Drivers earned $31.0 billion.", CONTEXTS) == 0.0
    # the words of a context in another order, or split across two contexts, are not support
    assert words.grounding("Freight connects Drivers with Delivery.", CONTEXTS) == 0.0
    assert words.grounding("Freight cities", CONTEXTS) == 0.0
    invented = "The product is a comprehensive and innovative solution to the growing demand of healthcare professionals."
    assert words.grounding(invented, CONTEXTS) == 0.0
    # one content word: found or not; none: 0
    assert words.grounding("Freight.", CONTEXTS) == 1.0
    assert words.grounding("Airplanes.", CONTEXTS) == 0.0
    assert words.grounding("It is.", CONTEXTS) == 0.0


# --- degenerate answers and refusals --------------------------------------------------------------


def test_repetition_finds_loops_and_spares_normal_answers() -> None:
    loop = "Uber's platform connects riders. The platform is the platform is the platform is the platform is good."
    assert gates.repetition(loop) == "the platform is"
    sentence = "Uber operates in many cities. It has three segments. Uber operates in many cities. Uber operates in many cities."
    assert gates.repetition(sentence) == "Uber operates in many cities."
    # a sentence said twice, apart, is a restated formula, not a loop; a long block said twice in a row is one
    assert gates.repetition("Uber operates in many cities. It has three segments. Uber operates in many cities.") is None
    twice = "Drivers and couriers earned $30.0 billion on our platform in 2021. " * 2
    assert gates.repetition(twice) == "drivers and couriers earned 30.0 billion on our platform in 2021"
    assert gates.repetition("very " * 5) is None and gates.repetition("very " * 6) == "very"
    assert gates.repetition("Uber had three operating segments: Mobility, Delivery and Freight.") is None
    assert gates.repetition("The number of trips grew; the number of drivers grew; the number of cities fell.") is None


@pytest.mark.parametrize("answer", [
    "The context does not say how many employees Uber has.",
    "The provided text doesn't mention the purpose of OpenSesame.",
    "This information is not provided in the context.",
    "I cannot answer this question based on the given context.",
    "There is no information about Careem in the passage.",
    "I don't know.",
])
def test_is_refusal(answer: str) -> None:
    assert gates.is_refusal(answer)


@pytest.mark.parametrize("answer", [
    "Uber does not provide insurance to drivers in every market.",
    "Drivers are not employees; they are independent contractors.",
    "Mobility connects consumers with transportation modalities.",
])
def test_is_not_refusal(answer: str) -> None:
    assert not gates.is_refusal(answer)


# --- RAFT chain of thought ------------------------------------------------------------------------


def test_restating_the_question_is_not_grounding() -> None:
    """Two real SmolLM2-135M answers of a demo run (teacher told to copy the context's words): a restatement of the
    question around an invented claim, and a copy of the context. Without the question both look grounded."""
    context = ("Further, we are subject to U.S. and foreign antitrust and competition laws. In April 2018, Careem "
               "publicly disclosed and notified relevant regulatory authorities that it had been subject to a data "
               "security breach that allowed access to certain personal information of riders and drivers.")
    question = 'What is the purpose of the "U.S. and foreign antitrust and competition laws" in the context of the question?'
    restated = ('The purpose of the "U.S. and foreign antitrust and competition laws" is to promote competition and '
                "protect the consumers, while also maintaining competitive trade and economy.")
    assert words.grounding(restated, [context]) >= 0.3  # the old score kept it
    assert words.grounding(restated, [context], question) == 0.0
    copied = ("In April 2018, Careem publicly disclosed and notified relevant regulatory authorities that it had been "
              "subject to a data security breach.")
    assert words.grounding(copied, [context], "What is the context of the data breach that affected Careem?") == 1.0
    assert check_answer(restated, "stop", [context], question=question).reason == "ungrounded"


def test_first_sentences_cut_at_a_sentence_boundary_once_the_next_one_began() -> None:
    text = 'Uber operates in 70 countries. It was founded in 2009 by Travis Kalanick. The'
    assert words.first_sentences(text, 1) == "Uber operates in 70 countries."
    assert words.first_sentences(text, 2) == "Uber operates in 70 countries. It was founded in 2009 by Travis Kalanick."
    assert words.first_sentences(text, 3) is None  # the third has not ended: generation goes on
    # abbreviations, amounts and a lower-case continuation are not boundaries
    assert words.first_sentences("Uber Technologies, Inc. is based in S.F. and grew $1.5 billion. Next", 1) == \
        "Uber Technologies, Inc. is based in S.F. and grew $1.5 billion."
    assert words.first_sentences('He said "it grew." Then it fell.', 1) == 'He said "it grew."'


def test_sentence_cap_cannot_cut_a_raft_chain_of_thought() -> None:
    from ragtune.data_prep.config import DataPrepConfig

    with pytest.raises(ValueError, match="teacher_max_sentences would cut RAFT's chain of thought"):
        DataPrepConfig(teacher_max_sentences=2, raft={"enabled": True, "chain_of_thought": True})


def test_final_answer_is_the_text_after_the_last_tag() -> None:
    assert words.final_answer("Reasoning. <ANSWER>: first <ANSWER>: Mobility, Delivery and Freight. ") == \
        "Mobility, Delivery and Freight."
    assert words.final_answer("  Mobility, Delivery and Freight.\n") == "Mobility, Delivery and Freight."
    assert words.final_answer("Reasoning only. <ANSWER>:  ") == ""


def test_quotes_must_be_verbatim_up_to_case_whitespace_and_outer_punctuation() -> None:
    good = ("The passage says ##begin_quote##we had three   operating\nsegments: Mobility, Delivery and "
            "Freight.##end_quote## and ##begin_quote## “4.6 million Drivers and couriers” ##end_quote##")
    assert gates.quotes(good)[0].startswith("we had three")
    assert gates.bad_quote(good, CONTEXTS) is None
    invented = "##begin_quote##we had four operating segments##end_quote##"
    assert gates.bad_quote(invented, CONTEXTS) == "we had four operating segments"
    straddling = "##begin_quote##Mobility connects consumers In 2021##end_quote##"
    assert gates.bad_quote(straddling, CONTEXTS) is not None
    assert gates.bad_quote("##begin_quote## ##end_quote##", CONTEXTS) == ""
    assert gates.bad_quote("##begin_quote##three operating segments", CONTEXTS) is None  # unclosed: checked to the end


# --- the verdict ----------------------------------------------------------------------------------


def test_check_answer_keeps_a_grounded_finished_answer() -> None:
    answer = "Uber had three operating segments: Mobility, Delivery and Freight."
    assert check_answer(answer, "stop", CONTEXTS, measure="bigram") == Verdict(True, None, pytest.approx(5 / 6), False)
    # support: uber (not in the contexts), three, operating, segment, mobility, delivery, freight
    assert check_answer(answer, "stop", CONTEXTS) == Verdict(True, None, pytest.approx(6 / 7), False)


@pytest.mark.parametrize(("text", "finish", "kwargs", "reason"), [
    ("", "stop", {}, "empty"),
    (None, "stop", {}, "empty"),
    ("Uber had three operating segments: Mobility, Delivery and", "length", {}, "truncated"),
    ("It is a comprehensive solution for healthcare professionals and hospitals.", "stop", {}, "ungrounded"),
    ("the segments are the segments are the segments are the segments are", "length", {}, "repetition"),
    ("The context does not say which segments Uber has.", "stop", {}, "refusal_with_oracle"),
    ("Mobility, Delivery and Freight.", "stop", {"chain_of_thought": True}, "missing_answer_tag"),
    ("##begin_quote##we had four segments##end_quote## <ANSWER>: Four.", "stop", {"chain_of_thought": True}, "bad_quote"),
    ("##begin_quote##three operating segments##end_quote## <ANSWER>:", "stop", {"chain_of_thought": True}, "empty"),
    # real SmolLM2 teacher answers that a whole-filing demo run kept and trained on (2026-11-30)
    ("Uber had three operating segments: Mobility, Delivery and Freight.\n\nQuestion: What are Uber's segments?",
     "stop", {}, "prompt_echo"),
    ("Context information: Uber had three operating segments.", "stop", {}, "prompt_echo"),
    ("Uber had three operating segments: Mobility, Delivery and Freight.\n\nAnswer:", "stop", {}, "prompt_echo"),
])
def test_check_answer_rejects_with_a_reason(text: str | None, finish: str, kwargs: dict, reason: str) -> None:
    verdict = check_answer(text, finish, CONTEXTS, **kwargs)
    assert not verdict.ok and verdict.reason == reason


def test_refusal_is_kept_only_without_the_oracle() -> None:
    refusal = "The context does not say how many employees Uber has."
    assert check_answer(refusal, "stop", CONTEXTS, oracle_in_context=False) == Verdict(True, None, 0.0, True)
    assert check_answer(refusal, "stop", CONTEXTS, oracle_in_context=True).reason == "refusal_with_oracle"


def test_prompt_labels_inside_words_or_raft_tags_are_not_echoes() -> None:
    assert gates.prompt_echo("Uber had three operating segments: Mobility, Delivery and Freight.") is None
    assert gates.prompt_echo("The questionnaire: Administrative Questionnaire.") is None
    assert gates.prompt_echo("##begin_quote##three operating segments##end_quote## <ANSWER>: Three.") is None
    assert check_answer("##begin_quote##three operating segments##end_quote## <ANSWER>: Three operating segments.",
                        "stop", CONTEXTS, chain_of_thought=True).ok


def test_chain_of_thought_answer_is_graded_on_its_final_answer() -> None:
    text = ("The context says ##begin_quote##we had three operating segments: Mobility, Delivery and Freight"
            "##end_quote##, so there are three.\n<ANSWER>: Mobility, Delivery and Freight.")
    verdict = check_answer(text, "stop", CONTEXTS, chain_of_thought=True)
    assert verdict.ok and verdict.grounding == 1.0
    assert check_answer(text, "stop", CONTEXTS, chain_of_thought=True, min_grounding=1.01).reason == "ungrounded"


def test_finish_reason_reported_or_inferred_from_the_budget() -> None:
    from ragtune.core.llm import Completion

    assert gates.finish_reason_of(Completion("a", completion_tokens=64), 64) == "length"
    assert gates.finish_reason_of(Completion("a", completion_tokens=12), 64) == "stop"
    reported = Completion("a", completion_tokens=64)
    reported.finish_reason = "stop"  # type: ignore[attr-defined]  # a backend that knows it produced EOS
    assert gates.finish_reason_of(reported, 64) == "stop"


def test_pick_best_takes_the_ok_candidate_the_others_agree_with_not_the_most_copied() -> None:
    """Three samples of one question: two agree on the computed growth, one copies the table's row. The copy
    grounds best; the answer the samples agree on wins."""
    texts = ["Total revenue grew 57%, from $11.1 billion in 2020 to $17.5 billion in 2021.",
             "Mobility $6,089 $6,953, Delivery 3,904 8,362, Freight 1,011 2,132, Total revenue $11,139 $17,455.",
             "Revenue grew 57% in 2021, from $11.1 billion to $17.5 billion.",
             "Revenue grew 57% in 2021, from $11.1 billion to $17.5 billion, and"]
    verdicts = [Verdict(True, None, 0.6), Verdict(True, None, 1.0), Verdict(True, None, 0.7), Verdict(False, "truncated", 0.7)]
    assert gates.pick_best(verdicts, texts) == 0  # ties in agreement go to the first
    assert gates.pick_best(verdicts[1:], texts[1:]) == 0  # two ok ones agree equally: the first
    # without texts: the most on topic, then the first ok one
    assert gates.pick_best([Verdict(True, None, 0.9, on_topic=0.2), Verdict(True, None, 0.5, on_topic=0.6)]) == 1
    assert gates.pick_best([Verdict(False, "empty")]) is None
    assert gates.pick_best([]) is None


# --- near-duplicate questions ---------------------------------------------------------------------


def test_near_duplicate_questions_points_at_the_earlier_kept_one() -> None:
    embeddings = [[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.98, 0.2], [0.1, 0.99]]
    questions = [f"q{i}" for i in range(len(embeddings))]
    assert gates.near_duplicate_questions(questions, embeddings, threshold=0.95) == [None, 0, None, 0, 2]
    assert gates.near_duplicate_questions([], [], threshold=0.9) == []


# --- real answers of the embedded teacher on real chunks of the excerpt ----------------------------

# (a phrase that picks the oracle chunk, a question that chunk answers)
REAL_CASES = [
    ("over 6 million members", "How many members did Uber's membership programs have when it exited 2021?"),
    ("Arizona State University", "How many Drivers and family members enrolled in the Arizona State University program?"),
    ("We were founded in 2009", "When was Uber founded and under which name was it incorporated?"),
    ("Seattle City Council", "What did the Seattle City Council pass in October 2020?"),
]
SHORT_ANSWER = "Answer in one or two sentences using only the context."


@pytest.fixture(scope="module")
def excerpt_chunks(excerpt_pdf) -> list[str]:
    """The excerpt split as the demo splits its documents (SentenceSplitter, chunk_size 256)."""
    from llama_index.core.node_parser import SentenceSplitter

    from ragtune.data_prep.documents import load_documents

    documents, _ = load_documents([excerpt_pdf])
    return [n.get_content() for n in SentenceSplitter(chunk_size=256, chunk_overlap=32).get_nodes_from_documents(documents)]


def test_quotes_of_real_pdf_text_pass_with_straight_quotes_and_other_line_breaks(excerpt_chunks: list[str]) -> None:
    """The PDF's curly quotes and paragraph breaks against a model's straight quotes on one line."""
    overview = next(c for c in excerpt_chunks if "ITEM 1. BUSINESS" in c)
    assert "\u201cUber,\u201d" in overview and "\n\nOverview\n\n" in overview
    answer = ('##begin_quote##Overview Uber Technologies, Inc. ("Uber," "we," "our," or "us") is a technology '
              "platform##end_quote##\n<ANSWER>: Uber is a technology platform.")
    assert check_answer(answer, "stop", excerpt_chunks[:1] + [overview], chain_of_thought=True).ok
    misquoted = answer.replace("technology platform##", "transportation company##")
    assert check_answer(misquoted, "stop", [overview], chain_of_thought=True).reason == "bad_quote"
    assert check_answer(answer, "stop", [excerpt_chunks[0]], chain_of_thought=True).reason == "bad_quote"


@pytest.fixture(scope="module")
def teacher_outputs(excerpt_chunks: list[str]) -> dict:
    """The teacher's answers to REAL_CASES with [oracle, distractor] contexts (80 and 4 new tokens), and its
    closed-book answers to the same questions: invented by construction. Loops are cut as prep cuts them."""
    from ragtune.data_prep.config import DataPrepConfig

    from ragtune.core.llm import HFChatBackend
    from ragtune.core.models import SMOLLM2_ALIAS
    from ragtune.core.rag import build_closed_book_messages, build_rag_messages

    distractor = next(c for c in excerpt_chunks if "seasonality" in c)
    contexts = [[next(c for c in excerpt_chunks if phrase in c), distractor] for phrase, _ in REAL_CASES]
    prompts = DataPrepConfig(system_prompt=SHORT_ANSWER)
    rag = [build_rag_messages(q, ctx, prompts) for (_, q), ctx in zip(REAL_CASES, contexts)]
    teacher = HFChatBackend(SMOLLM2_ALIAS, batch_size=8)
    def loop(text: str) -> bool:
        return gates.repetition(text) is not None

    return {"contexts": contexts,
            "rag": teacher.chat(rag, max_new_tokens=80, stop_when=loop),
            "cut": teacher.chat(rag, max_new_tokens=4),
            "closed_book": teacher.chat([build_closed_book_messages(q, prompts) for _, q in REAL_CASES],
                                        max_new_tokens=48, stop_when=loop)}


@pytest.mark.slow
def test_real_answers_cut_by_the_budget_are_rejected_as_truncated(teacher_outputs: dict) -> None:
    for completion, contexts in zip(teacher_outputs["cut"], teacher_outputs["contexts"]):
        assert completion.completion_tokens == 4
        verdict = check_answer(completion.text, gates.finish_reason_of(completion, 4), contexts)
        assert verdict.reason == "truncated", completion.text


@pytest.mark.slow
def test_real_answers_from_the_context_pass_and_outscore_closed_book_ones(teacher_outputs: dict) -> None:
    """Each RAG answer scores above the same question's closed-book answer (invented: the teacher never saw the
    chunk), and the finished grounded ones pass every gate: the small teacher's setting, `measure: bigram`."""
    verdicts = []
    for rag, closed, contexts in zip(teacher_outputs["rag"], teacher_outputs["closed_book"], teacher_outputs["contexts"]):
        verdict = check_answer(rag.text, gates.finish_reason_of(rag, 80), contexts, measure="bigram")
        verdicts.append(verdict)
        assert verdict.grounding > words.grounding(closed.text, contexts), (rag.text, closed.text)
        assert words.grounding(closed.text, contexts) < gates.MIN_GROUNDING["bigram"], closed.text
    assert sum(v.ok for v in verdicts) >= 2, [(c.text, v) for c, v in zip(teacher_outputs["rag"], verdicts)]


# --- a strong teacher's answers (written from data/uber_2021.pdf as GPT-4 writes: paraphrase, unit conversions,
# computed figures, lists, a hedge) --------------------------------------------------------------------------

REVENUE = ("Revenue Year Ended December 31, 2020 to 2021 % Change (In millions, except percentages) 2020 2021 Mobility "
           "$ 6,089 $ 6,953 14 % Delivery 3,904 8,362 114 % Freight 1,011 2,132 111 % All Other 135 8 (94) % Total revenue "
           "$ 11,139 $ 17,455 57 %")
BALANCE = ("Liabilities, redeemable non-controlling interests and equity Accounts payable $ 235 $ 860 Short-term insurance "
           "reserves 1,243 1,442 Operating lease liabilities, current 175 185 Accrued and other current liabilities 5,112 "
           "6,537 Liabilities held for sale 100 — Total current liabilities 6,865 9,024 Long-term insurance reserves 2,223 2,546")
STRONG = [  # (question, answer, its contexts): each one a false rejection of the old gates, named in the comment
    ("How much did Uber's total revenue grow from 2020 to 2021?",  # paraphrase, billions from millions, a computed figure
     "Uber's revenue rose from $11.1 billion in 2020 to $17.5 billion in 2021, an increase of about $6.3 billion, or "
     "57%. Delivery more than doubled, from $3,904 million to $8,362 million.", REVENUE),
    ("What were Uber's revenues by segment in 2021?",  # a list naming "for the year ended December 31" three times
     "Uber reported three segments:\n1. Mobility: $6,953 million for the year ended December 31, 2021.\n"
     "2. Delivery: $8,362 million for the year ended December 31, 2021.\n"
     "3. Freight: $2,132 million for the year ended December 31, 2021.", REVENUE),
    ("How did Uber's accrued liabilities change in 2021?",  # a term named three times in a calculation
     "Accrued and other current liabilities were $6,537 million at the end of 2021. Accrued and other current "
     "liabilities were $5,112 million a year earlier, so accrued and other current liabilities grew by $1,425 million.",
     BALANCE),
    ("How did Uber's segments grow in 2021?",  # a hedge about one part of an answer is no refusal
     "Mobility revenue grew 14% to $6,953 million and Delivery revenue grew 114% to $8,362 million in 2021. "
     "The table does not provide the number of trips behind these figures.", REVENUE),
]
REFUSALS = ["The provided context does not include Uber's 2021 capital expenditures, so they cannot be determined.",
            "Based on the data provided, it is not possible to calculate Uber's capital expenditures. "
            "The table lists revenue by segment only."]


@pytest.mark.parametrize(("question", "answer", "context"), STRONG, ids=["computed", "list", "term_3x", "hedge"])
def test_a_strong_teachers_correct_answer_is_kept_and_rejected_with_another_filings_page(
        question: str, answer: str, context: str) -> None:
    verdict = check_answer(answer, "stop", [context], question=question)
    assert verdict.ok, verdict
    # what the old gates rejected it for: a 4-word phrase seen three times ("repetition"), or few bigrams
    phrases = Counter(zip(*(words.WORD.findall(words.normalize(answer))[i:] for i in range(4))))
    assert max(phrases.values()) >= 3 or words.grounding(answer, [context], question) < 0.3
    other = BALANCE if context is REVENUE else REVENUE
    assert check_answer(answer, "stop", [other], question=question).reason == "ungrounded"


def test_support_credits_converted_and_rounded_figures_but_not_a_wrong_one() -> None:
    question = "What was Uber's total revenue in 2021?"
    assert words.support("It was $17.5 billion.", [REVENUE], question) == 1.0  # 17,455 million, rounded
    assert words.support("It was $17,455,000,000.", [REVENUE], question) == 1.0  # the same figure in dollars
    assert words.support("It was $18.2 billion.", [REVENUE], question) == 0.0
    # a restatement of the question supports nothing; years, dates' days and list numbers are no claim
    assert words.support("Uber's total revenue in 2021.", [REVENUE], question) == 0.0
    assert words.figures("1. On December 31, 2021, 3 segments earned $2,018 million and 57%.") == ["2018", "57"]


@pytest.mark.parametrize("answer", REFUSALS)
def test_a_refusal_with_the_oracle_shown_is_still_rejected(answer: str) -> None:
    assert check_answer(answer, "stop", [REVENUE], question="What were Uber's capital expenditures?").reason == \
        "refusal_with_oracle"


# --- `ragtune gates`: the gates on a user's labelled answers --------------------------------------------------


def _labelled(tmp_path: Any) -> Any:
    rows = [{"question": q, "contexts": [c], "answer": a, "label": "good"} for q, a, c in STRONG]
    rows += [{"question": q, "contexts": [BALANCE if c is REVENUE else REVENUE], "answer": a, "label": "bad"}
             for q, a, c in STRONG]
    rows += [{"question": "What were Uber's capital expenditures?", "contexts": [REVENUE], "answer": a,
              "label": "refusal", "note": "other keys are ignored"} for a in REFUSALS]
    rows.append({"question": "What was revenue?", "contexts": [REVENUE], "answer": "Revenue was $17,455 million in",
                 "label": "good", "finish_reason": "length"})
    path = tmp_path / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_ragtune_gates_reports_kept_and_reasons_per_label_auroc_and_thresholds(tmp_path: Any, capsys: Any) -> None:
    from ragtune.app.cli import main

    path = _labelled(tmp_path)
    assert main(["gates", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["measure"] == "support" and report["min_grounding"] == gates.MIN_GROUNDING["support"]
    assert report["labels"]["good"] == {"n": 5, "kept": 4, "keep_rate": 0.8, "reasons": {"truncated": 1}}
    assert report["labels"]["bad"]["kept"] == 0 and report["labels"]["bad"]["reasons"] == {"ungrounded": 4}
    assert report["labels"]["refusal"] == {"n": 2, "kept": 0, "keep_rate": 0.0, "reasons": {"refusal_with_oracle": 2}}
    assert report["auroc"] == 1.0  # every correct answer's own pages support it more than another filing's
    keep_95 = report["suggested"]["keep_95_good"]
    assert keep_95["keep_rate"]["good"] == 0.8  # the truncated one is lost at any threshold
    assert report["suggested"]["keep_90_good"]["min_grounding"] >= keep_95["min_grounding"]
    # the readable table, and the bigram measure for a small teacher
    assert main(["gates", str(path), "--set", "data_prep.answer_gates.measure=bigram"]) == 0
    table = capsys.readouterr().out
    assert "measure bigram, min_grounding 0.3" in table and "advice:" in table
    assert re.search(r"^good\s+5\s+\d\s", table, re.MULTILINE)


def test_ragtune_gates_names_a_malformed_line(tmp_path: Any, capsys: Any) -> None:
    from ragtune.app.cli import main

    path = _labelled(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[2] = json.dumps({"question": "q", "contexts": "not a list", "answer": "a", "label": "good"})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["gates", str(path)]) == 2
    error = capsys.readouterr().err
    assert f"{path}:3: key 'contexts' must be a list of strings" in error and error.count("\n") == 1


@pytest.mark.parametrize(("answer", "declines"), [
    ("I'm sorry, but I cannot provide Uber's interest coverage ratio from the given data.", True),
    ("Unfortunately, the information needed to calculate the ratio is not available in the provided context.", True),
    ("The provided balance sheet does not contain the number of shares, so the value per share cannot be computed.", True),
    ("The 10-K excerpt does not disclose Uber's Adjusted EBIT for 2021.", True),
    ("The information given is insufficient to answer this question.", True),
    ("Revenue grew 57% to $17,455 million. The table does not break down revenue by city.", False),
    ("Mobility revenue was $6,953 million in 2021. The table does not show 2019, which was not asked for.", False),
])
def test_refusals_are_said_up_front_or_throughout_and_a_hedge_is_none(answer: str, declines: bool) -> None:
    assert gates.is_refusal(answer) is declines

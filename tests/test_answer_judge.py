"""The judge where the lexical gate is unsure (`answer_gates.llm_faithfulness`): which candidates it decides, and
that a judge error is retried and never recorded as "unfaithful". The judge is an OpenAI-compatible endpoint on
127.0.0.1 (ragtune's real OpenAI backend talks to it) whose verdicts the test sets."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from ragtune.core.gates import AnswerGates, check_answer
from ragtune.core.llm import Completion, OpenAIChatBackend
from ragtune.data_prep.answers import JUDGE_ATTEMPTS, AnswerJob, _judge_faithfulness
from ragtune.core.teacher import BestOfN
from ragtune.core.llm import LazyBackend

REVENUE = ("Revenue Year Ended December 31, 2020 to 2021 (In millions) 2020 2021 Mobility $ 6,089 $ 6,953 Delivery "
           "3,904 8,362 Freight 1,011 2,132 Total revenue $ 11,139 $ 17,455")
QUESTION = "How did Uber's revenue change in 2021?"
ANSWERS = {
    "copied": "Total revenue was $17,455 million in 2021 against $11,139 million in 2020.",  # passes: the judge vetoes
    "unsure": "Sales climbed strongly, led by food orders: Delivery reached $8,362 million, Eats outpaced rides.",
    "invented": "Growth came from autonomous trucks sold in Europe and from advertising partnerships.",
    "refusal": "The context does not say how revenue changed.",
}


class Judge:
    """Verdicts by answer: `faithful[name]` (True/False), or `errors[name]` failed calls before one is given."""

    def __init__(self, faithful: dict[str, bool], errors: dict[str, int]):
        self.faithful, self.errors, self.asked = faithful, dict(errors), []

    def answer(self, prompt: str) -> tuple[int, dict[str, Any]]:
        name = next(n for n, text in ANSWERS.items() if text in prompt)
        self.asked.append(name)
        if self.errors.get(name, 0) > 0:
            self.errors[name] -= 1
            return 500, {"error": {"message": "judge overloaded"}}
        content = json.dumps({"faithful": self.faithful[name]})
        return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "judge",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


@pytest.fixture
def judge_server() -> Iterator[tuple[str, list[Judge]]]:
    judges: list[Judge] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server API)
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            status, payload = judges[-1].answer(body["messages"][-1]["content"])
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            data = json.dumps({"object": "list", "data": [{"id": "judge", "object": "model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1", judges
    httpd.shutdown()


def _judge(url: str, judges: list[Judge], faithful: dict[str, bool], errors: dict[str, int] | None = None) -> LazyBackend:
    judges.append(Judge(faithful, errors or {}))
    return LazyBackend(lambda: OpenAIChatBackend(model="judge", base_url=url, max_retries=0, max_consecutive_failures=99))


def _gated(gates: AnswerGates) -> tuple[list[AnswerJob], list[BestOfN], list[list[Any]]]:
    job = AnswerJob({"id": "q1", "question": QUESTION}, [], [REVENUE], ["c1"], True)
    candidates = [Completion(text, finish_reason="stop") for text in ANSWERS.values()]
    verdicts = [check_answer(c.text, "stop", job.contexts, question=QUESTION, min_grounding=gates.min_grounding)
                for c in candidates]
    pick = BestOfN(candidates, verdicts)
    return [job], [pick], [pick.verdicts]


def test_the_judge_decides_the_unsure_band_and_vetoes_a_passed_answer(judge_server: Any) -> None:
    url, judges = judge_server
    gates = AnswerGates(llm_faithfulness=True)
    jobs, picks, verdicts = _gated(gates)
    before = dict(zip(ANSWERS, verdicts[0]))
    assert before["copied"].ok and before["unsure"].reason == "ungrounded" and before["invented"].reason == "ungrounded"
    assert gates.judge_min_grounding <= before["unsure"].grounding and before["invented"].grounding < gates.judge_min_grounding
    _judge_faithfulness(jobs, picks, _judge(url, judges, {"copied": False, "unsure": True}), gates)
    after = dict(zip(ANSWERS, verdicts[0]))
    assert sorted(judges[-1].asked) == ["copied", "unsure"]  # the form gates' rejects and the clearly ungrounded: no call
    assert after["copied"].reason == "unfaithful" and after["unsure"].ok and after["unsure"].detail == "the judge: faithful"
    assert after["invented"].reason == "ungrounded" and after["refusal"].reason == "refusal_with_oracle"


def test_a_judge_error_is_retried_and_never_recorded_as_unfaithful(judge_server: Any) -> None:
    url, judges = judge_server
    gates = AnswerGates(llm_faithfulness=True)
    jobs, picks, verdicts = _gated(gates)
    # "unsure" fails once, then is judged faithful; "copied" fails every attempt: it keeps the lexical verdict
    _judge_faithfulness(jobs, picks, _judge(url, judges, {"copied": False, "unsure": True},
                                                            {"unsure": 1, "copied": JUDGE_ATTEMPTS}), gates)
    after = dict(zip(ANSWERS, verdicts[0]))
    assert judges[-1].asked.count("unsure") == 2 and judges[-1].asked.count("copied") == JUDGE_ATTEMPTS
    assert after["unsure"].ok and after["copied"].ok and after["copied"].detail is None
    assert not any(v.reason == "unfaithful" for v in verdicts[0])

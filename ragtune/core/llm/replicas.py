"""Several endpoints of one model as one backend: rows spread by load, a replica that stops answering left out."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from ragtune.core.llm.openai import OpenAIChatBackend, fan_out
from ragtune.core.llm.types import BackendUnavailable, Completion, Message, RowLost, Schema, Schemas

log = logging.getLogger(__name__)


class ReplicaBackend:
    """One role on several OpenAI-compatible endpoints that serve the same model (`base_url` as a list: vLLM
    servers started alike, with no router in front). Each row goes to the live replica with the fewest rows in
    flight, each holding up to the role's `max_concurrency`, so every endpoint stays busy. A replica that loses a
    row and then does not answer `/models` is left out for the rest of this backend's life (a rerun tries it again)
    and the row goes to another one: rows come back in order, each answered once. Only with every replica out does
    a call raise BackendUnavailable, as one endpoint does."""

    def __init__(self, replicas: list[OpenAIChatBackend]):
        self.replicas = replicas
        self.model_name = replicas[0].model_name
        self.base_url = ", ".join(r.base_url for r in replicas)
        self.batch_size = sum(r.batch_size for r in replicas)
        self.in_flight = [0] * len(replicas)
        self.answered = [0] * len(replicas)  # rows each replica answered: how the work was spread
        self.left_out: dict[int, str] = {}  # replica index -> why
        self._free = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=self.batch_size)
        self._probed = False

    def probe(self, timeout: float | None = None) -> None:
        """Every replica's GET /models; those that give no answer are left out, and with none left this raises."""
        for index, replica in enumerate(self.replicas):
            try:
                replica.probe(timeout)
            except BackendUnavailable as err:
                self._leave_out(index, str(err))
        self._probed = True
        if len(self.left_out) == len(self.replicas):
            raise self._none_left()

    def chat(
        self,
        conversations: list[list[Message]],
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        json_schema: Schemas | None = None,
        stop_when: Callable[[str], bool] | None = None,
        top_logprobs: int | None = None,
    ) -> list[Completion]:
        if not self._probed:
            self.probe()
        params = self.replicas[0].params(max_new_tokens, temperature, top_logprobs)
        return fan_out(self._pool, lambda c, schema: self._row(c, params, schema, stop_when), conversations,
                       json_schema)

    def _row(self, messages: list[Message], params: dict[str, Any], schema: Schema | None,
             stop_when: Callable[[str], bool] | None) -> Completion:
        lost = ""
        for _ in range(2 * len(self.replicas)):  # a row every replica loses while answering /models is failed
            index = self._take()
            replica = self.replicas[index]
            try:
                completion = replica._request(messages, replica._with_schema(params, schema), stop_when)
            except (RowLost, BackendUnavailable) as err:
                lost = str(err)
                if isinstance(err, BackendUnavailable) or not self._answers(replica):
                    self._leave_out(index, lost)
                continue
            finally:
                self._give_back(index)
            with self._free:
                self.answered[index] += 1
            return completion
        return Completion(None, f"no answer after retries on every replica: {lost}")

    def _take(self) -> int:
        """A slot on the live replica with the fewest rows in flight (waiting while all are full)."""
        with self._free:
            while True:
                live = [i for i in range(len(self.replicas)) if i not in self.left_out]
                if not live:
                    raise self._none_left()
                open_ = [i for i in live if self.in_flight[i] < self.replicas[i].batch_size]
                if open_:
                    index = min(open_, key=lambda i: self.in_flight[i])
                    self.in_flight[index] += 1
                    return index
                self._free.wait()

    def _give_back(self, index: int) -> None:
        with self._free:
            self.in_flight[index] -= 1
            self._free.notify_all()

    @staticmethod
    def _answers(replica: OpenAIChatBackend) -> bool:
        try:
            replica.probe()
        except BackendUnavailable:
            return False
        return True

    def _leave_out(self, index: int, why: str) -> None:
        with self._free:
            if index not in self.left_out:
                self.left_out[index] = why
                log.warning("replica %s left out: %s", self.replicas[index].base_url, why.splitlines()[0][:300])
            self._free.notify_all()

    def _none_left(self) -> BackendUnavailable:
        reasons = "; ".join(f"{self.replicas[i].base_url}: {why.split('. ')[0]}" for i, why in self.left_out.items())
        return BackendUnavailable(f"no replica of {self.model_name} is answering ({reasons}). Rows finished so far "
                                  "are saved: start or fix the servers (or `base_url`), then rerun to continue.")

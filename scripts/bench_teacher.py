"""Teacher answers per second: ragtune's prep stage vs the plain sequential LlamaIndex loop, in one run.

Both sides use the same persisted index, the same questions, the same weights, greedy decoding and the same
`max_new_tokens`:

- baseline: `for q in questions: query_engine.query(q)` with a LlamaIndex `CustomLLM` over the HF model
  (the way the LlamaIndex fine-tuning recipe collects teacher answers), one question at a time;
- ragtune: `data_prep.prep.make_answers`, the stage itself (batched retrieval; generation through
  `--backend`: `vllm`, the managed vLLM server, concurrent requests; or `hf`, batched left-padded
  generation in-process; rows appended and fsynced as they arrive). The answer gates are off here, so every
  question becomes a row and both sides generate exactly the same requests.

Prints one JSON object: `ratio` is ragtune rows/s over baseline rows/s (target >= 4), `identical` the share
of questions where both sides' answers are the same text. The vLLM server's start is timed apart.

    python scripts/bench_teacher.py                      # the demo's prep settings (configs/demo.yaml)
    python scripts/bench_teacher.py --config configs/gpu-qlora.yaml --model <local copy of its teacher>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = [
    "In how many countries is Uber's technology available?",
    "What are Uber's three operating and reportable segments?",
    "What does the Mobility segment connect consumers with?",
    "What kinds of vehicles do Mobility Drivers use to provide rides?",
    "What does Uber Freight connect shippers with?",
    "Which company did Uber acquire in 2021 to expand Uber Freight?",
    "How is Uber's ridesharing category position calculated?",
    "What did Transport for London decide about Uber's license in November 2019?",
    "What did Mexico City's Secretaria de Movilidad prohibit for ridesharing services?",
    "What does the Delivery segment allow consumers to do?",
    "Who are referred to as Drivers in Uber's annual report?",
    "What is Uber's advocacy position on benefits for independent workers?",
    "What did California's Proposition 22 introduce for platform companies?",
    "Where is Uber's principal executive office located?",
    "How does Uber measure the success of its culture with employees?",
    "What are the inefficiencies in the freight industry that Uber Freight addresses?",
    "What does Uber say about competition in the mobility and delivery industries?",
    "What regulations govern Transportation Network Companies?",
    "How does Uber describe the foundation of its platform?",
    "What are end-users on Uber's platform?",
    "What risks do forward-looking statements in the report involve?",
    "Which regions are excluded from Uber's global availability?",
    "What does Uber offer carriers on its freight platform?",
    "How many employees did Uber have at the end of 2021?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"),
                        help="the run whose prep stage is measured: its teacher's max_new_tokens and max_concurrency, "
                             "its data_prep's chunk_size, chunk_overlap and similarity_top_k (the flags below win)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="teacher model (HF id, folder or alias)")
    parser.add_argument("--documents", default=str(REPO / "tests" / "data" / "uber_10k_excerpt.pdf"))
    parser.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"at most {len(QUESTIONS)}")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--batch-size", type=int, help="ragtune's requests in flight (the teacher's max_concurrency)")
    parser.add_argument("--similarity-top-k", type=int)
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--chunk-overlap", type=int)
    parser.add_argument("--backend", choices=["vllm", "hf"], default="vllm", help="ragtune's teacher backend")
    parser.add_argument("--torch-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="weights of both sides (the teacher role's torch_dtype: vLLM's --dtype); fp32 by default, "
                             "where vLLM's kernels and HF's agree token for token")
    args = parser.parse_args()
    from ragtune.app.config import load_config

    run = load_config(args.config)  # ragtune's own defaults where the file sets nothing
    for name, value in (("max_new_tokens", run.teacher.max_new_tokens), ("batch_size", run.teacher.max_concurrency),
                        ("similarity_top_k", run.data_prep.similarity_top_k),
                        ("chunk_size", run.data_prep.chunk_size), ("chunk_overlap", run.data_prep.chunk_overlap)):
        if getattr(args, name) is None:
            setattr(args, name, value)
    with tempfile.TemporaryDirectory(prefix="bench_teacher_") as work:
        print(json.dumps(bench(args, Path(work)), indent=2))


def prepare_run(args: argparse.Namespace, work: Path, questions: list[str]) -> tuple[Any, Any, Any, list, Any, dict]:
    """A run folder with the config, chunks, index and the training questions; every page a training page."""
    from ragtune.app.config import load_config
    from ragtune.core.artifacts import write_jsonl
    from ragtune.core.rag import embedding_model
    from ragtune.core.run_dir import RunDir
    from ragtune.data_prep.prep import make_chunks, make_index, region_of
    from ragtune.data_prep.state import StepState

    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "name": "bench", "output_dir": str(work / "run"), "documents": [args.documents],
        "teacher": {"backend": args.backend, "model": args.model, "max_new_tokens": args.max_new_tokens,
                    "batch_size": args.batch_size, "max_concurrency": args.batch_size,
                    "torch_dtype": args.torch_dtype},
        "student": {"model": args.model}, "judge": {"model": args.model},
        "data_prep": {"chunk_size": args.chunk_size, "chunk_overlap": args.chunk_overlap,
                      "similarity_top_k": args.similarity_top_k,
                      "answer_gates": {"enabled": False}},
    }), encoding="utf-8")
    config = load_config(config_path)
    run_dir = RunDir(config.output_dir)
    run_dir.data.mkdir(parents=True)
    state = StepState(run_dir)
    chunks, _ = make_chunks(config, run_dir, state)
    index = make_index(config, run_dir, state, chunks, embedding_model(config.embedding))
    chunk_ids = [c["id"] for c in chunks]
    write_jsonl(run_dir.questions_train, [
        {"id": f"bench-q{i:02d}", "question": q, "source_chunk_id": chunk_ids[i % len(chunk_ids)], "split": "train"}
        for i, q in enumerate(questions)
    ])
    # every page is a training page here: both sides retrieve from the whole index
    split = {"train": {region_of(c, config.data_prep.split_unit) for c in chunks}, "eval": set()}
    return config, run_dir, state, chunks, index, split


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    from ragtune.core import servers
    from ragtune.core.llm import HFChatBackend, LazyBackend, make_backend
    from ragtune.data_prep.prep import make_answers

    questions = QUESTIONS[: args.questions]
    config, run_dir, state, chunks, index, split = prepare_run(args, work, questions)

    hf = HFChatBackend(args.model, torch_dtype=args.torch_dtype, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens)
    hf.chat([[{"role": "user", "content": "Hello"}]], max_new_tokens=4)  # warm-up
    started = time.perf_counter()
    teacher = hf if args.backend == "hf" else make_backend(config.teacher)
    start_seconds = time.perf_counter() - started
    teacher.chat([[{"role": "user", "content": "Hello"}]], max_new_tokens=4)

    # baseline: the plain sequential LlamaIndex loop
    query_engine = index.as_query_engine(
        llm=_HFLlamaIndexLLM(hf.model, hf.tokenizer, args.max_new_tokens),
        similarity_top_k=args.similarity_top_k, text_qa_template=_chat_qa_template(config.data_prep),
    )
    started = time.perf_counter()
    baseline_answers = [str(query_engine.query(q)).strip() for q in questions]
    baseline_seconds = time.perf_counter() - started

    # ragtune: the stage's teacher step
    started = time.perf_counter()
    make_answers(config, run_dir, state, index, split, LazyBackend(lambda: teacher), LazyBackend(lambda: None))
    ragtune_seconds = time.perf_counter() - started
    servers.shutdown_all()
    rows = {r["meta"]["question_id"]: r for r in map(json.loads, run_dir.train_jsonl.read_text(encoding="utf-8").splitlines())}
    answers = [rows[f"bench-q{i:02d}"]["messages"][-1]["content"] for i in range(len(questions))]

    result = {
        "model": args.model, "backend": args.backend, "torch_dtype": args.torch_dtype, "questions": len(questions),
        "config": args.config, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "chunk_size": args.chunk_size, "similarity_top_k": args.similarity_top_k, "chunks": len(chunks),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "baseline": {"rows": len(baseline_answers), "seconds": round(baseline_seconds, 2),
                     "rows_per_s": round(len(baseline_answers) / baseline_seconds, 3)},
        "ragtune": {"rows": len(rows), "seconds": round(ragtune_seconds, 2),
                    "rows_per_s": round(len(rows) / ragtune_seconds, 3), "server_start_seconds": round(start_seconds, 1),
                    "new_tokens": sum(r["meta"]["usage"]["completion_tokens"] for r in rows.values())},
        "identical": round(sum(a == b for a, b in zip(answers, baseline_answers)) / len(questions), 3),
    }
    result["ratio"] = round(result["ragtune"]["rows_per_s"] / result["baseline"]["rows_per_s"], 2)
    return result


def _chat_qa_template(prep: Any) -> Any:
    """The same system + user messages ragtune builds, as a LlamaIndex chat prompt template."""
    from llama_index.core.llms import ChatMessage, MessageRole
    from llama_index.core.prompts import ChatPromptTemplate

    return ChatPromptTemplate([
        ChatMessage(role=MessageRole.SYSTEM, content=prep.system_prompt),
        ChatMessage(role=MessageRole.USER, content=prep.text_qa_template),
    ])


def _HFLlamaIndexLLM(model: Any, tokenizer: Any, max_new_tokens: int) -> Any:
    """A LlamaIndex `CustomLLM` over an in-memory HF model: chat template, greedy, one prompt at a time."""
    from llama_index.core.llms import CompletionResponse, CustomLLM, LLMMetadata
    from pydantic import PrivateAttr

    class HFLlamaIndexLLM(CustomLLM):
        _model: Any = PrivateAttr()
        _tokenizer: Any = PrivateAttr()
        _max_new_tokens: int = PrivateAttr()

        @property
        def metadata(self) -> LLMMetadata:
            return LLMMetadata(context_window=8192, num_output=self._max_new_tokens, is_chat_model=True,
                               model_name="hf-custom")

        def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
            import torch

            inputs = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self._model.device)
            with torch.inference_mode():
                output = self._model.generate(**inputs, max_new_tokens=self._max_new_tokens, do_sample=False,
                                              temperature=None, top_p=None, top_k=None,
                                              pad_token_id=self._tokenizer.pad_token_id)
            return CompletionResponse(text=self._tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                                  skip_special_tokens=True).strip())

        def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> Any:
            yield self.complete(prompt, formatted=formatted, **kwargs)

    def messages_to_prompt(messages: Any) -> str:
        conversation = [{"role": m.role.value, "content": m.content} for m in messages]
        return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    llm = HFLlamaIndexLLM(messages_to_prompt=messages_to_prompt)
    llm._model, llm._tokenizer, llm._max_new_tokens = model, tokenizer, max_new_tokens
    return llm


if __name__ == "__main__":
    main()

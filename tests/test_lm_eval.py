"""lm-evaluation-harness drives the cluster as researchers do: ``local-completions`` scores
a multiple-choice task from local files with echo + logprobs, and every per-example
log-likelihood equals transformers' on the same checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import local_cluster

from olmo_model.cache_limits import CacheLimits
from olmo_model.demo import DEMO_MODEL_DIR

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [
    ("The Python interpreter", ["is a program", "reads files", "is red"], 0),
    ("A class defines", [" methods", " colours", " rivers"], 0),
    ("To open a file, call", [" open()", " close()", " print()"], 0),
    ("A list is", [" mutable", " a number", " a tuple"], 0),
]
TASK = """task: olmo_demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def cluster():
    c = local_cluster(DEMO_MODEL_DIR, cache=CacheLimits(8, 4096, 512), http=True)
    yield c
    c.stop()


def test_local_completions_log_likelihoods_equal_transformers(cluster, demo_reference,
                                                              tmp_path, monkeypatch):
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                            for q, c, a in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "olmo_demo_mc.yaml").write_text(TASK.format(data=data))
    lm = get_model("local-completions")(
        base_url=f"{cluster.http_url}/v1/completions", model=DEMO_MODEL_DIR.name,
        tokenizer=str(DEMO_MODEL_DIR), tokenizer_backend="huggingface",
        tokenized_requests=True, num_concurrent=1, max_retries=1)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["olmo_demo_mc"], task_manager=TaskManager(
            include_path=str(tmp_path / "tasks")), log_samples=True)
    samples = results["samples"]["olmo_demo_mc"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            context_ids, continuation_ids = lm._encode_pair(context, continuation)
            ids = context_ids + continuation_ids
            with torch.no_grad():
                logp = torch.log_softmax(
                    demo_reference(torch.tensor([ids])).logits[0].double(), -1)
            expected = sum(float(logp[len(context_ids) - 1 + i, token])
                           for i, token in enumerate(continuation_ids))
            assert response[0][0] == pytest.approx(expected, abs=1e-3)
    assert 0.0 <= results["results"]["olmo_demo_mc"]["acc,none"] <= 1.0

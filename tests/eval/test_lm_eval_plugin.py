"""lm-evaluation-harness plug-in: ``--model attnkit --model_args pretrained=smollm2,recipe=...`` on a local
multiple-choice task written here (5 items, no network). SmolLM2 is the session fixture (load_smollm2 is
patched to return it, so ``pretrained=smollm2`` does not load the weights a second time)."""

import gc
import json

import pytest

lm_eval = pytest.importorskip("lm_eval")
plugin = pytest.importorskip("attnkit.eval.lm_eval_plugin")

pytestmark = pytest.mark.slow

ITEMS = [
    ("The capital of France is", ["Paris", "Berlin", "Madrid"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Kelvin", "Newton"], 0),
    ("The opposite of hot is", ["sunny", "cold", "fast"], 1),
    ("Two plus two equals", ["five", "three", "four"], 2),
    ("The sky on a clear day is", ["green", "blue", "loud"], 1),
]
TASK_YAML = """task: attnkit_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_task")
    with open(d / "items.jsonl", "w") as fh:
        for q, choices, label in ITEMS:
            fh.write(json.dumps({"question": q, "choices": choices, "label": label}) + "\n")
    (d / "attnkit_tiny_mc.yaml").write_text(TASK_YAML.format(data=d / "items.jsonl"))
    return d


def _evaluate(model, model_args, task_dir, config=None):
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["attnkit_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  log_samples=True,
                                  bootstrap_iters=0)
    lls = [r[0][0] for s in res["samples"]["attnkit_tiny_mc"] for r in s["resps"]]
    if config is not None:
        config.update(res["config"])
    return res["results"]["attnkit_tiny_mc"]["acc,none"], lls


def test_misspelled_recipe_fails_before_the_model_loads(monkeypatch):
    import attnkit.models
    from attnkit.eval.errors import EvalError

    def must_not_load(dtype=None):
        raise AssertionError("the model was loaded before the recipe was checked")

    monkeypatch.setattr(attnkit.models, "load_smollm2", must_not_load)
    with pytest.raises(EvalError, match="recipe=act-lama: unknown recipe 'act-lama'; did you mean 'act-llama'"):
        plugin.AttnkitLM(pretrained="smollm2", recipe="act-lama")


def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("attnkit") is plugin.AttnkitLM


def test_plugin_recipes(smollm2, task_dir, monkeypatch):
    import attnkit.models

    model, tok = smollm2
    monkeypatch.setattr(attnkit.models, "load_smollm2", lambda dtype=None: (model, tok))
    base_config = {}
    acc0, base = _evaluate("attnkit", "pretrained=smollm2", task_dir, base_config)
    assert base_config["attnkit"]["recipe"] is None
    acc1, noop = _evaluate("attnkit", "pretrained=smollm2,recipe=noop", task_dir)
    gc.collect()  # the noop handle goes with its AttnkitLM
    assert len(base) == 15 and 0.0 <= acc0 <= 1.0
    assert noop == base and acc1 == acc0
    lm = plugin.AttnkitLM(pretrained=model, tokenizer=tok, recipe="act-llama", batch_size=8)
    config = {}
    try:
        assert lm.handle is not None
        _, act = _evaluate(lm, None, task_dir, config)  # an instance: lm-eval records no model_args
    finally:
        lm.detach()
    import hashlib

    import attnkit

    yaml_text = attnkit.load_recipe("act-llama").to_yaml()
    assert config["model_args"] is None
    assert config["attnkit"]["recipe"]["name"] == "act-llama" and config["attnkit"]["attached"]
    assert config["attnkit"]["recipe"]["sha256"] == hashlib.sha256(yaml_text.encode()).hexdigest()
    assert all(a != pytest.approx(b, abs=1e-4) for a, b in zip(act, base))
    assert _evaluate("attnkit", "pretrained=smollm2", task_dir)[1] == base  # detached: stock model again

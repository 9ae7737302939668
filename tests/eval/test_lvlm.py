"""POPE and CHAIR end to end on the tiny random LLaVA with the real coco_tiny images: processor, batched
left-padded generation, intervention arms through attach(), datasets-loaded questions, CLI. The numbers are
meaningless (random weights); what is asserted is the pipeline."""

import json

import pytest
import torch

from attnkit.eval import get_task, read_records, run_eval
from attnkit.eval.generation import load_image
from attnkit.eval.lvlm import RANDOM_WEIGHTS_NOTE, tiny_llava

FASTV_K1 = """name: fastv-k1
version: 1
description: FastV with K=1 (the tiny LLaVA has 2 layers).
interventions:
  - method: fastv
    params: {k: 1, ratio: 0.5, rule: last, mode: drop}
"""


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def fastv_k1(tmp_path_factory):
    path = tmp_path_factory.mktemp("recipes") / "fastv-k1.yaml"
    path.write_text(FASTV_K1)
    return str(path)


def test_processor_on_coco_images(llava):
    model, proc = llava
    task = get_task("chair")
    images = [load_image(ex["image"]) for ex in task.examples()[:2]]
    assert images[0].size != images[1].size  # real COCO images of different shapes
    texts = ["USER: <image>\nIs there a dog in the image? ASSISTANT:", "USER: <image>\nDescribe it. ASSISTANT:"]
    proc.tokenizer.padding_side = "left"
    batch = proc(images=images, text=texts, return_tensors="pt", padding=True)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    n_img = (batch["input_ids"] == model.config.image_token_id).sum(1)
    assert n_img.tolist() == [16, 16]
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padded
    assert "<unk>" not in proc.tokenizer.convert_ids_to_tokens(batch["input_ids"][0])
    with torch.no_grad():  # the image reaches the logits
        a = model(**batch).logits[:, -1]
        b = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}).logits[:, -1]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name,key", [("pope_random", "answer"), ("chair", "caption")])
def test_batched_equals_one_by_one(llava, name, key):
    model, proc = llava
    one, four = get_task(name, batch_size=1, max_new_tokens=6), get_task(name, batch_size=4, max_new_tokens=6)
    exs = one.examples()[:4]
    singles = [one.run_batch(model, proc, [ex])[0] for ex in exs]
    batched = four.run_batch(model, proc, exs)
    assert [r[key] for r in batched] == [r[key] for r in singles]
    assert all(r["image_used"] for r in batched)


@pytest.mark.parametrize("name", ["pope_random", "chair"])
def test_end_to_end_arms(llava, fastv_k1, tmp_path, name):
    model, proc = llava
    task = get_task(name, batch_size=4, max_new_tokens=8, note=RANDOM_WEIGHTS_NOTE)
    rep = run_eval(model, proc, task, ["baseline", fastv_k1, "var-auto"], limit=8, out_dir=tmp_path,
                   progress=False, n_boot=50)
    assert rep["n_paired"] == 8 and set(rep["deltas"]) == {"fastv-k1", "var-auto"}
    for arm, d in rep["deltas"].items():
        for m in task.metrics:
            assert d[m]["ci_low"] <= d[m]["delta"] <= d[m]["ci_high"], (arm, m)
    recs = read_records(tmp_path)
    assert len(recs) == 24 and all(r["image_used"] for r in recs)
    if name == "chair":  # FastV drops half the image tokens: the captions change
        by = {(r["arm"], r["id"]): r["caption"] for r in recs}
        assert any(by[("fastv-k1", i)] != by[("baseline", i)] for _, i in by)
        assert sum(len(r["mentions"]) for r in recs) > 0
    md = (tmp_path / "report.md").read_text()
    assert "meaningless" in md and "| fastv-k1 |" in md and (tmp_path / "metric_vs_arm.png").exists()
    assert json.loads((tmp_path / "report.json").read_text())["params"]["batch_size"] == 4


def test_pope_questions_from_datasets(llava, tmp_path):
    """source=datasets: a save_to_disk folder (offline stand-in for a hub name), file names or embedded images."""
    datasets = pytest.importorskip("datasets")
    model, proc = llava
    qs = get_task("pope_popular").examples()[:6]
    rows = [{"question_id": q["id"], "question": q["text"], "answer": q["label"].upper(),
             "image": q["image"].rsplit("/", 1)[-1], "category": "popular"} for q in qs]
    rows.append({**rows[0], "question_id": "x", "category": "random"})  # other split: filtered out
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "files"))
    from attnkit.data import data_path

    task = get_task("pope_popular", source="datasets", dataset=str(tmp_path / "files"),
                    image_dir=str(data_path("coco_tiny", "val2017")), batch_size=3)
    exs = task.examples()
    assert [e["id"] for e in exs] == [q["id"] for q in qs] and [e["label"] for e in exs] == [q["label"] for q in qs]
    assert [e["image"] for e in exs] == [q["image"] for q in qs]
    # embedded images, lmms-lab/POPE layout (id, question, answer, image, category)
    emb = datasets.Dataset.from_list([{"id": str(i), "question": q["text"], "answer": q["label"],
                                       "image": load_image(q["image"]).resize((48, 40)), "category": "popular"}
                                      for i, q in enumerate(qs[:2])])
    emb.save_to_disk(str(tmp_path / "embedded"))
    task = get_task("pope_popular", source="datasets", dataset=str(tmp_path / "embedded"), batch_size=2)
    exs = task.examples()
    assert [e["image"] for e in exs] == [None, None] and [e["index"] for e in exs] == [0, 1]
    recs = task.run_batch(model, proc, exs)
    assert all(r["image_used"] for r in recs) and [r["label"] for r in recs] == [q["label"] for q in qs[:2]]


def test_cli_tiny_llava(tmp_path, capsys):
    from attnkit.eval.__main__ import main

    assert main(["--model", "tiny-llava", "--task", "chair", "--recipes", "baseline", "--limit", "2",
                 "--out", str(tmp_path), "--no-progress", "--no-figures", "--n-boot", "20",
                 "--set", "max_new_tokens=4"]) == 0
    assert "meaningless" in capsys.readouterr().out


def test_pope_datasets_hub_name_path(monkeypatch):
    """A hub name goes to datasets.load_dataset(name, config, split=...) (offline here: the call is faked)."""
    datasets = pytest.importorskip("datasets")
    from attnkit.eval.metrics.pope import load_questions_dataset

    calls = []
    fake = datasets.Dataset.from_list([{"question_id": 7, "question": "Is there a cat in the image?", "answer": "yes",
                                        "image_source": "COCO_val2014_000000000042", "category": "adversarial"}])

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return fake

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows, _ = load_questions_dataset("someone/POPE", split="test", category="adversarial")
    assert calls == [("someone/POPE", None, "test")]
    assert rows == [{"question_id": "7", "text": "Is there a cat in the image?", "label": "yes",
                     "image": "COCO_val2014_000000000042.jpg", "index": 0}]
    assert load_questions_dataset("someone/POPE", category="random")[0] == []

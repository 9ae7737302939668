"""``make demo`` (attnkit.demo) on the real SmolLM2: the texts and figures it writes, against independent references
(plain transformers generation, eager attention weights, ACT's sink rule). Replaces tests/core/test_demo.py, which
checked the earlier stock-attention-only demo."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import attnkit
from attnkit import demo, viz

pytestmark = pytest.mark.slow
TOKENS = 12


@pytest.fixture(scope="module")
def demo_run(smollm2, tmp_path_factory):
    """Run the demo once with the session's SmolLM2; keep the Figure objects it saved."""
    model, tok = smollm2
    out = tmp_path_factory.mktemp("demo")
    saved = {}
    real_save = viz.save_figure

    def save(fig, path, **kw):
        saved[path.name] = fig
        return real_save(fig, path, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("attnkit.models.load_smollm2", lambda: (model, tok))
        mp.setattr(viz, "save_figure", save)
        assert demo.main(["--out", str(out), "--max-new-tokens", str(TOKENS)]) == 0
    return out, saved, json.loads((out / "summary.json").read_text())


def stock_generation(model, tok, batch):
    n = batch["input_ids"].shape[1]
    with torch.no_grad():
        return tok.decode(model.generate(**batch, max_new_tokens=TOKENS, do_sample=False)[0, n:],
                          skip_special_tokens=True).strip()


@pytest.fixture(scope="module")
def eager_attentions(smollm2):
    """Stock attention weights from transformers' own eager implementation: ``[L, H, N, N]``."""
    model, tok = smollm2
    batch = demo.chat_inputs(tok, demo.DEFAULT_PROMPT)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(**batch, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack([a[0] for a in att]).float()


def test_writes_figures_and_texts(demo_run):
    out, saved, summary = demo_run
    assert sorted(p.name for p in out.iterdir()) == ["attention_maps.png", "generations.md", "sink_mass.png",
                                                      "summary.json"]
    for name in ("attention_maps.png", "sink_mass.png"):
        image = np.asarray(Image.open(out / name).convert("L"))
        assert image.shape[0] > 400 and image.shape[1] > 800 and image.std() > 10  # drawn, not blank
    md = (out / "generations.md").read_text()
    assert f"**stock:** {summary['stock']}" in md and f"**act-llama:** {summary['intervened']}" in md
    assert summary["prompt"] in md and summary["recipe"] == "act-llama"


def test_texts_are_the_stock_and_the_recipe_generations(demo_run, smollm2):
    _, _, summary = demo_run
    model, tok = smollm2
    batch = demo.chat_inputs(tok, demo.DEFAULT_PROMPT)
    assert summary["stock"] == stock_generation(model, tok, batch)  # plain transformers, nothing attached
    with attnkit.attach(model, "act-llama"):
        assert summary["intervened"] == stock_generation(model, tok, batch)
    assert summary["intervened"] != summary["stock"]  # the recipe changes this answer within 12 tokens


def test_sink_numbers_match_eager_attention_and_act(demo_run, eager_attentions):
    _, _, summary = demo_run
    first = eager_attentions[:, :, 1:, 0].mean(-1).mean(-1)  # [L]
    np.testing.assert_allclose(summary["first_token_mass_stock"], first.numpy(), atol=1e-4)
    assert first[12:].mean() > 0.3  # the attention sink of real weights (layers 12-29)
    stock, act = np.array(summary["other_sink_mass_stock"]), np.array(summary["other_sink_mass_intervened"])
    np.testing.assert_allclose(act[:2], stock[:2], atol=1e-5)  # layers 0-1: before the recipe's layers 2:-1
    changed = stock[2:29] > 0.02
    assert changed.sum() >= 15 and (act[2:29][changed] < 0.7 * stock[2:29][changed]).all()  # sinks keep ~beta=0.4


def test_attention_figure_shares_one_scale_and_shows_the_captured_maps(demo_run, eager_attentions):
    _, saved, _ = demo_run
    fig = saved["attention_maps.png"]
    stock_side, recipe_side = fig.subfigs
    images = [[ax.images[0] for ax in side.axes if ax.images] for side in (stock_side, recipe_side)]
    assert len(images[0]) == len(images[1]) == 6  # 2 layers x 3 heads per side
    assert len({im.get_clim() for side in images for im in side}) == 1
    assert recipe_side.axes[0].get_title() == stock_side.axes[0].get_title()
    for ax, image in zip((ax for ax in stock_side.axes if ax.images), images[0]):
        layer, head = (int(word) for word in ax.get_title().replace("·", " ").split() if word.isdigit())
        np.testing.assert_allclose(np.asarray(image.get_array()), eager_attentions[layer, head].numpy(), atol=1e-4)
    assert any(not np.allclose(a.get_array(), b.get_array(), atol=1e-3) for a, b in zip(*images))


def test_sink_figure_shares_its_y_axis(demo_run):
    _, saved, summary = demo_run
    fig = saved["sink_mass.png"]
    axes = [side.axes[0] for side in fig.subfigs]
    assert axes[0].get_ylim() == axes[1].get_ylim()
    lines = [{line.get_label(): line.get_ydata() for line in ax.lines} for ax in axes]
    np.testing.assert_allclose(lines[0]["first token"], summary["first_token_mass_stock"], atol=1e-6)
    np.testing.assert_allclose(lines[1]["other sinks (column score > 0.1)"], summary["other_sink_mass_intervened"],
                               atol=1e-6)


def test_readme_snippet_prints_what_the_readme_shows(smollm2, monkeypatch, capsys):
    """The README's Python snippet runs and prints exactly the block the README shows after it."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code, shown = re.search(r"```python\n(.*?)```\n\nprints\n\n```\n(.*?)```", readme, re.S).groups()
    monkeypatch.setattr("attnkit.models.load_smollm2", lambda: smollm2)
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out == shown

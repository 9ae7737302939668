"""Scorers (hand cases + tiny models), ACT head selection, per-head temperature."""

import math

import pytest
import torch

import attnkit
from attnkit.interventions.calibration.act_select import select_act_heads
from attnkit.interventions.calibration.temperature import HeadTemperature
from attnkit.interventions.scoring.divergence import drop_image_tokens, vhd_select, vision_divergence_scores
from attnkit.interventions.scoring.image import image_centric_scores
from attnkit.interventions.scoring.retrieval import (
    copy_paste_hits,
    copy_paste_score,
    newline_stop_ids,
    retrieval_scores,
    retrieval_trial,
)
from attnkit.interventions.scoring.sink import sink_scores
from attnkit.interventions.scoring.streaming import local_mass, streaming_scores
from attnkit.scores import HeadScores
from attnkit.testing import tiny_causal_lm, tiny_vlm, vlm_inputs

IDS = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def test_retrieval_worked_example_and_wrong_token():
    prompt = torch.arange(100, 125)
    j = torch.tensor([[11, 11]])
    assert copy_paste_hits(j, prompt, 111, (10, 14)).tolist() == [[True, True]]
    assert copy_paste_hits(j, prompt, 112, (10, 14)).tolist() == [[False, False]]  # attends 11 but emits other
    assert not copy_paste_hits(torch.tensor([[20]]), prompt, 120, (10, 14)).any()  # copy outside the needle


def test_retrieval_counting_positions_never_exceeds_one_steps_is_the_released_code():
    prompt = torch.arange(100, 125)
    # METHODS.md worked example: span [10, 14), j* = 11, 12, 20; the first two steps copy
    j = torch.tensor([11, 12, 20]).view(3, 1, 1)
    for counting in ("positions", "steps"):
        assert copy_paste_score(j, prompt, [111, 112, 999], (10, 14), counting).item() == 0.5
    # a two-token needle copied twice before the newline (the answer repeats it): 4 copying steps
    j = torch.tensor([10, 11, 10, 11]).view(4, 1, 1)
    tokens = [110, 111, 110, 111]
    assert copy_paste_score(j, prompt, tokens, (10, 12), "steps").item() == 2.0  # released code: 4 x 1/2
    assert copy_paste_score(j, prompt, tokens, (10, 12), "positions").item() == 1.0  # |g ∩ k| / |k|
    # attending a needle position without copying it earns nothing in either counting
    assert copy_paste_score(j[:1], prompt, [999], (10, 12), "positions").item() == 0.0


class _WordTokenizer:
    """Token id i is the word ``w{i}``; ``newline`` is the id that encodes "\n" (a stand-in for a real tokenizer)."""

    eos_token_id = None

    def __init__(self, newline: int):
        self.newline = newline

    def __call__(self, text, add_special_tokens=False):
        assert text == "\n"
        return {"input_ids": [self.newline]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{int(i)}" for i in ids)


def test_retrieval_trial_counts_copies_on_tiny_model():
    model = tiny_causal_lm("llama")
    ids = IDS[:1]
    score, gen = retrieval_trial(model, ids, (3, 9), max_new_tokens=4)
    assert score.shape == (2, 4) and gen.numel() == 4
    assert bool(((score >= 0) & (score <= 4 / 6 + 1e-6)).all())
    # recompute by hand from captured last rows of a no-cache run over prompt + generated tokens
    seq = torch.cat([ids[0], gen[:-1]])[None]
    with attnkit.attach(model, [], backend="eager") as h, h.capture(queries="all") as cap, torch.no_grad():
        model(seq)
    credited = torch.zeros(2, 4, 6, dtype=torch.bool)
    for step, tok in enumerate(gen.tolist()):
        row = ids.shape[1] - 1 + step
        j = torch.stack([cap.last(layer)[0, :, row, : row + 1].argmax(-1) for layer in (0, 1)])  # [L, H]
        hit = copy_paste_hits(j, ids[0], tok, (3, 9))
        for layer, head in hit.nonzero().tolist():
            credited[layer, head, j[layer, head] - 3] = True
    assert torch.allclose(score, credited.sum(-1).float() / 6)
    hs = retrieval_scores(model, [{"input_ids": ids, "needle_span": (3, 9)}] * 2, success_fn=None,
                          stop_ids=(), max_new_tokens=4)
    assert torch.allclose(hs.scores, score)
    with pytest.raises(ValueError, match="no successful"):
        retrieval_scores(model, [{"input_ids": ids, "needle_span": (3, 9)}], success_fn=lambda g, t: False,
                         stop_ids=(), max_new_tokens=2)


def test_retrieval_defaults_newline_stop_and_rouge_success():
    model = tiny_causal_lm("llama")
    ids_a, ids_b = IDS[:1], IDS[1:]
    _, free = retrieval_trial(model, ids_a, (3, 9), max_new_tokens=6)  # what the model says without a stop
    with pytest.raises(ValueError, match="tokenizer"):
        retrieval_scores(model, [{"input_ids": ids_a, "needle_span": (3, 9)}])
    tok = _WordTokenizer(newline=int(free[2]))  # the third answer token is "the newline"
    assert newline_stop_ids(tok) == [int(free[2])]
    score_a, gen_a = retrieval_trial(model, ids_a, (3, 9), max_new_tokens=6, stop_ids=newline_stop_ids(tok))
    first_newline = free.tolist().index(int(free[2]))
    assert gen_a.tolist() == free[: first_newline + 1].tolist()  # stops after emitting the newline
    score_b, gen_b = retrieval_trial(model, ids_b, (3, 9), max_new_tokens=6, stop_ids=newline_stop_ids(tok))
    answer_a = tok.decode(gen_a)
    trials = [{"input_ids": ids_a, "needle_span": (3, 9), "reference": answer_a},  # recall 100: counts
              {"input_ids": ids_b, "needle_span": (3, 9), "reference": "w126 w127"}]  # recall 0: left out
    hs = retrieval_scores(model, trials, tokenizer=tok, max_new_tokens=6)
    assert hs.params["successful"] == 1 and trials[0]["rouge"] == 100.0 and trials[1]["rouge"] == 0.0
    assert torch.allclose(hs.scores, score_a)
    every = retrieval_scores(model, trials, success_fn=None, tokenizer=tok, max_new_tokens=6)
    assert torch.allclose(every.scores, (score_a + score_b) / 2)
    assert float(hs.scores.max()) <= 1.0


def test_sink_and_streaming_scores_match_hand_computation():
    model = tiny_causal_lm("llama")
    mask = torch.ones_like(IDS)
    mask[1, :2] = 0
    inputs = {"input_ids": IDS, "attention_mask": mask}
    hs = sink_scores(model, inputs)
    with attnkit.attach(model, [], backend="eager") as h, h.capture(queries="all") as cap, torch.no_grad():
        model(**inputs)
    p = cap.last(1)  # [B, H, N, N]
    want = torch.stack([p[0, :, 1:, 0].mean(-1), p[1, :, 3:, 2].mean(-1)])  # rows after the first real token
    want = (want[0] * 11 + want[1] * 9) / 20
    assert torch.allclose(hs.scores[1], want, atol=1e-6)
    st = streaming_scores(model, inputs, num_sinks=1, window=2)
    assert st.scores.shape == (2, 4) and bool((st.scores <= 1 + 1e-6).all())
    lm = local_mass(p, mask.bool(), 1, 2)
    assert torch.allclose(lm[0, :, 5], p[0, :, 5, [0, 4, 5]].sum(-1))


def test_image_centric_and_vhd_on_tiny_vlm():
    model = tiny_vlm("llava")
    inputs = vlm_inputs("llava", model, batch=2)
    hs = image_centric_scores(model, inputs, min_image_mass=0.05)
    assert hs.scores.shape == (2, 4) and bool(((hs.scores >= 0) & (hs.scores <= 1)).all())
    text = drop_image_tokens(inputs, model.config.image_token_id)
    vhd = vision_divergence_scores(model, inputs, text)
    assert vhd.scores.shape == (2, 4) and bool((vhd.scores > 0).all())
    assert vhd_select(vhd.scores).sum(-1).tolist() == [2, 2]  # distinct values: strict > lower median = top half
    assert bool((vhd.selected.sum(-1) >= 1).all())


def test_vhd_worked_example_population_vs_sample_sigma():
    vhd = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    assert vhd_select(vhd).nonzero()[:, 1].tolist() == [1, 2]
    ta = torch.tensor([[0.0, 10.0, 0.0, 0.0]])
    assert vhd_select(vhd, ta).nonzero()[:, 1].tolist() == [2, 3]


def test_act_head_selection_sweep_saves_and_targets(tmp_path):
    model = tiny_causal_lm("llama", num_hidden_layers=4)
    ids = IDS[:1]
    score = lambda m: m(ids).logits[0, -1].log_softmax(-1)[7].item()  # noqa: E731
    hs = select_act_heads(model, score, layers=[1, 2], heads=[0, 3], theta=0.08, save_to=tmp_path / "act")
    base = hs.params["baseline"]
    assert math.isnan(hs.scores[0, 0]) and math.isnan(hs.scores[1, 1])
    from attnkit.interventions.sinks.act import ACT

    with attnkit.attach(model, [ACT(layers=[2], heads=[3], theta=0.08)], backend="eager"), torch.no_grad():
        assert abs(hs.scores[2, 3].item() - (score(model) - base)) < 1e-6
    want = {l: [h for h in (0, 3) if hs.scores[l, h] > 0] for l in (1, 2)}
    assert hs.layer_heads() == {l: v for l, v in want.items() if v}
    loaded = HeadScores.load(tmp_path / "act.safetensors")
    assert torch.equal(loaded.selected, hs.selected) and loaded.method == "act-head-selection"


def test_head_temperature_equals_scaled_queries_and_runs_on_torch():
    model = tiny_causal_lm("llama")
    iv = HeadTemperature(temperature={1: [2.0, 1.0, 0.5, 1.0]}, layers=[1])
    with attnkit.attach(model, [iv], backend="eager") as h, h.capture(layers=[1], queries="all") as cap, \
            torch.no_grad():
        eager = model(IDS).logits
    with attnkit.attach(model, [], backend="eager") as h, h.capture(layers=[1], queries="all") as cap0, \
            torch.no_grad():
        model(IDS)
    p0, p1 = cap0.last(1), cap.last(1)
    logp = p0[0, 0].clamp_min(1e-30).log()  # head 0 at T=2: softmax(s/2) ∝ sqrt(p)
    assert torch.allclose(p1[0, 0], torch.softmax(logp / 2, -1).masked_fill(p0[0, 0] == 0, 0), atol=1e-5)
    assert torch.allclose(p1[0, 1], p0[0, 1], atol=1e-6)
    with attnkit.attach(model, [iv], backend="torch"), torch.no_grad():
        assert torch.allclose(model(IDS).logits, eager, atol=1e-4)
    with pytest.raises(ValueError, match="positive"):
        HeadTemperature(temperature=[1.0, -1.0])

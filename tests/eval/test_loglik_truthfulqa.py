"""Log-likelihood helper (hand reference, batch == per-sample, both padding sides) and TruthfulQA scoring."""

import math

import pytest
import torch

from attnkit.eval.loglik import encode_pair, loglikelihood
from attnkit.eval.metrics import truthfulqa as tqa


def test_encode_pair_moves_trailing_space(byte_tok):
    ctx, cont = encode_pair(byte_tok, "Q: A ", "B")
    assert byte_tok.decode(ctx) == "Q: A" and byte_tok.decode(cont) == " B"


def test_empty_context_gets_bos(byte_tok):
    ctx, cont = encode_pair(byte_tok, "", "hi")
    assert ctx == [byte_tok.bos_token_id] and byte_tok.decode(cont) == "hi"


def test_loglikelihood_matches_direct_computation(tiny_llama, byte_tok):
    ids = byte_tok("Hello world")["input_ids"]  # 11 byte tokens; continuation " world" = last 6
    with torch.no_grad():
        logp = torch.log_softmax(tiny_llama(torch.tensor([ids])).logits[0], -1)  # [11, V]
    expected = sum(logp[t - 1, ids[t]].item() for t in range(5, 11))
    (got,) = loglikelihood(tiny_llama, byte_tok, [("Hello", " world")])
    assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_equals_per_sample(tiny_llama, byte_tok, side):
    pairs = [("The cat", " sat"), ("A much longer context here", " ok"), ("x", " a longer continuation"),
             ("Q: what?\nA:", " nothing.")]
    single = [loglikelihood(tiny_llama, byte_tok, [p], batch_size=1)[0] for p in pairs]
    batched = loglikelihood(tiny_llama, byte_tok, pairs, batch_size=4, padding_side=side)
    assert batched == pytest.approx(single, abs=1e-4)


def test_padding_side_validated(tiny_llama, byte_tok):
    with pytest.raises(ValueError, match="padding_side"):
        loglikelihood(tiny_llama, byte_tok, [("a", " b")], padding_side="middle")


def test_mc_scores_hand_computed():
    s = tqa.mc_scores(-1.0, [-1.0, -3.0], [-2.0, -1.0])
    expected_mc2 = (math.exp(-1) + math.exp(-3)) / (2 * math.exp(-1) + math.exp(-3) + math.exp(-2))
    assert s == {"mc1": 0.0, "mc2": pytest.approx(expected_mc2), "mc3": 0.0}
    assert tqa.mc_scores(-1.0, [-1.0], [-2.0, -1.0], mc1_rule="argmax")["mc1"] == 1.0  # tie goes to gold
    assert tqa.mc_scores(-0.5, [-0.5, -3.0], [-2.0, -1.0])["mc3"] == 0.5
    # log-space MC2 does not underflow where exp() would
    assert tqa.mc_scores(-2000.0, [-2000.0], [-2001.0])["mc2"] == pytest.approx(1 / (1 + math.exp(-1)))


def test_csv_loading_and_normalisation():
    rows = tqa.load_truthfulqa()
    assert len(rows) == 817
    assert rows[0]["correct"][0] == "Nothing happens."
    assert all(a.endswith(".") for r in rows for a in r["correct"] + r["incorrect"])
    assert tqa.split_answers("a; ;b.") == ["a.", "b."]


def test_prompt_layout():
    p = tqa.prompt("Why?")
    assert p.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert p.endswith("Barcelona, Spain.\n\nQ: Why?\nA:")
    assert p.count("\n\nQ: ") == 6


def test_score_question_consistent(tiny_llama, byte_tok):
    row = {"question": "Is it?", "best": "Yes.", "correct": ["Yes.", "Sure."], "incorrect": ["No.", "Never."]}
    rec = tqa.score_question(tiny_llama, byte_tok, row)
    ll = rec["lls"]
    assert len(ll) == 5
    assert rec == {**tqa.mc_scores(ll[0], ll[1:3], ll[3:]), "lls": ll}
    direct = loglikelihood(tiny_llama, byte_tok, [(tqa.prompt("Is it?"), " No.")], batch_size=1)[0]
    assert ll[3] == pytest.approx(direct, abs=1e-4)

"""The interactive attention view: what it embeds equals the capture, it shows only captured rows, it works offline,
and (under node, with a minimal DOM) hovering a token puts the captured row on screen."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import attnkit
from attnkit.capture import Capture, CaptureRecord
from attnkit.testing import tiny_causal_lm
from attnkit.viz import AttentionView, attention_view
from attnkit.viz._view_assets import SCRIPT
from attnkit.viz.interactive import forward_passes

FAKE_DOM = Path(__file__).with_name("fake_dom.js")
F16 = dict(rtol=2e-3, atol=1e-6)  # what float16 storage keeps of a probability


# ---- independent readers of the page ------------------------------------------------------------------------------
def embedded(html: str) -> dict:
    """The JSON payload inside the page, parsed back."""
    found = re.findall(r'<script type="application/json" id="[\w-]+-data">(.*?)</script>', html, flags=re.S)
    assert len(found) == 1
    return json.loads(found[0])


def f16(b64: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(b64), dtype="<f2").astype(np.float32)


def stored_row(payload: dict, layer: int, pos: int, head: int) -> np.ndarray:
    """Row of (layer, query position, head index) from the documented layout: per layer, [H, L_p] blocks in the
    order of the positions, L_p the stored length; keys past L_p are zero."""
    entry = next(e for e in payload["layers"] if e["layer"] == layer)
    n_heads, data = len(payload["heads"]), f16(entry["data"])
    i = entry["positions"].index(pos)
    start = n_heads * sum(entry["lengths"][:i]) + head * entry["lengths"][i]
    row = np.zeros(payload["n_keys"], dtype=np.float32)
    row[: entry["lengths"][i]] = data[start: start + entry["lengths"][i]]
    return row


def stored_map(payload: dict, layer: int, step: int, head: int, token: int) -> np.ndarray:
    """Cross mode: the [h, w] map of one token (NaN where no latent row was captured)."""
    entry = next(e for e in payload["layers"] if e["layer"] == layer)
    n_heads, n_tokens = len(payload["heads"]), len(payload["tokens"])
    block = f16(entry["data"][step]).reshape(n_heads, len(entry["rows"]), n_tokens)
    h, w = entry["grid"]
    out = np.full(h * w, np.nan, dtype=np.float32)
    out[entry["rows"]] = block[head, :, token]
    return out.reshape(h, w)


def run_in_node(payload: dict, actions: list, tmp_path: Path) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script is only checked from Python")
    (tmp_path / "view.js").write_text(SCRIPT)
    (tmp_path / "payload.json").write_text(json.dumps(payload))
    (tmp_path / "actions.json").write_text(json.dumps(actions))
    done = subprocess.run([node, str(FAKE_DOM), str(tmp_path / "view.js"), str(tmp_path / "payload.json"),
                           str(tmp_path / "actions.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ---- fixtures ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama")  # 2 layers, 4 heads


@pytest.fixture(scope="module")
def all_rows(llama):
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29]])
    with attnkit.attach(llama, []) as handle, torch.no_grad(), handle.capture(queries="all", heads=[1, 3]) as cap:
        llama(ids)
    return cap


@pytest.fixture(scope="module")
def last_rows(llama):
    ids = torch.tensor([[5, 9, 13, 17, 21, 25, 29]])
    with attnkit.attach(llama, []) as handle, torch.no_grad(), handle.capture(queries="last") as cap:
        llama(ids)
    return cap


TOKENS = ["The", "quick", "brown", "fox", "jumps", "over", "it"]


# ---- text ----------------------------------------------------------------------------------------------------------
def test_text_view_embeds_the_captured_rows(all_rows):
    view = attention_view(all_rows, tokens=TOKENS)
    payload = embedded(view.html())
    assert payload["mode"] == "text" and payload["tokens"] == TOKENS and payload["heads"] == [1, 3]
    for layer in (0, 1):
        probs = all_rows.last(layer)[0]  # [2 heads, 7 queries, 7 keys]
        entry = next(e for e in payload["layers"] if e["layer"] == layer)
        assert entry["positions"] == list(range(7))
        assert entry["lengths"] == [p + 1 for p in range(7)]  # causal rows stored without their trailing zeros
        for pos in range(7):
            for h in range(2):
                np.testing.assert_allclose(stored_row(payload, layer, pos, h), probs[h, pos].numpy(), **F16)


def test_heads_and_layers_select_what_is_embedded(all_rows):
    payload = attention_view(all_rows, tokens=TOKENS, layers=[1], heads=[3]).payload
    assert [e["layer"] for e in payload["layers"]] == [1] and payload["heads"] == [3]
    np.testing.assert_allclose(stored_row(payload, 1, 4, 0), all_rows.last(1)[0, 1, 4].numpy(), **F16)


def test_a_last_query_capture_exposes_only_the_last_token(last_rows, tmp_path):
    view = attention_view(last_rows, tokens=TOKENS)
    assert view.query_positions == [6]
    assert all(e["positions"] == [6] for e in view.payload["layers"]) and view.payload["queries"] == "last"
    for layer in (0, 1):
        for h in range(4):
            np.testing.assert_allclose(stored_row(view.payload, layer, 6, h), last_rows.last(layer)[0, h, 0].numpy(),
                                       **F16)
    out = run_in_node(view.payload, [["hover", 2], ["click", 3]], tmp_path)
    first, hovered, clicked = out["snapshots"]
    assert first["state"]["query"] == 6 and hovered["state"]["query"] == 6  # token 2 is not selectable
    assert "1 of 7 tokens" in first["note"] and "cannot be selected" in first["note"]
    assert "was not captured as a query" in clicked["readout"]
    assert "(not captured as a query)" in first["chips"]["2"][1] and "click to pin" in first["chips"]["6"][1]


def test_generate_rows_land_at_their_positions(llama):
    ids = torch.tensor([[5, 9, 13, 17]])
    with attnkit.attach(llama, []) as handle, torch.no_grad(), handle.capture(queries="last") as cap:
        out = llama.generate(ids, max_new_tokens=3, do_sample=False)
    view = attention_view(cap, tokens=[str(t) for t in out[0].tolist()])
    assert view.query_positions == [3, 4, 5]  # the prefill's last token, then one query per decoding step
    decode = [r for r in cap.records if r.layer == 1][1]  # the first decoding step: 5 keys
    assert decode.probs.shape[-1] == 5
    np.testing.assert_allclose(stored_row(view.payload, 1, 4, 2)[:5], decode.probs[0, 2, 0].numpy(), **F16)


def test_forward_passes_and_the_calls_argument(llama):
    with attnkit.attach(llama, []) as handle, torch.no_grad(), handle.capture(queries="all") as cap:
        llama(torch.tensor([[5, 9, 13, 17, 21]]))
        llama(torch.tensor([[7, 8, 9]]))
    passes = forward_passes(cap.records)
    assert [[r.probs.shape[-1] for r in p] for p in passes] == [[5, 5], [3, 3]]  # two prompts, two layers each
    default = attention_view(cap)
    assert default.query_positions == [0, 1, 2] and "forward pass 1 of the 2" in default.payload["note"]
    first = attention_view(cap, forward=0)
    assert first.query_positions == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(stored_row(first.payload, 0, 4, 0), cap.records[0].probs[0, 0, 4].numpy(), **F16)
    with pytest.raises(ValueError, match=r"forward=2 is out of range: the capture holds 2 forward passes"):
        attention_view(cap, forward=2)


def test_hovering_a_token_shows_its_row_in_the_page(all_rows, tmp_path):
    view = attention_view(all_rows, tokens=TOKENS)
    out = run_in_node(view.payload, [["hover", 3], ["head", 1], ["layer", 1], ["click", 5], ["hover", 2]], tmp_path)
    start, hover3, head1, layer1, pinned5, after = out["snapshots"]
    probs0, probs1 = all_rows.last(0)[0], all_rows.last(1)[0]
    np.testing.assert_allclose(start["current"], probs0[:, 6].mean(0).numpy(), **F16)  # default: last row, mean
    np.testing.assert_allclose(hover3["current"], probs0[:, 3].mean(0).numpy(), **F16)
    np.testing.assert_allclose(head1["current"], probs0[1, 3].numpy(), **F16)  # option 1 = the 2nd captured head (3)
    np.testing.assert_allclose(layer1["current"], probs1[1, 3].numpy(), **F16)
    np.testing.assert_allclose(pinned5["current"], probs1[1, 5].numpy(), **F16)
    assert after["state"]["query"] == 5 and after["state"]["pinned"]  # pinned: hovering reads a key instead
    assert "key #2 'brown'" in after["readout"]
    top = int(np.argmax(pinned5["current"]))
    assert pinned5["chips"][str(top)][0] == view.payload["strip_lut"][-1]  # the row's maximum has the darkest colour
    assert pinned5["chips"]["6"][0] == view.payload["strip_lut"][0]  # a key after the query gets nothing
    assert out["selects"][1] == ["mean of 2 heads", "head 1", "head 3"]
    np.testing.assert_array_equal(out["decoded"], f16(view.payload["layers"][0]["data"]))  # JS decode == numpy


# ---- image patch grid (LVLM) ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm_capture():
    from attnkit.testing import tiny_vlm

    model = tiny_vlm("llava", seed=0)
    cfg = model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    img_tok = cfg.image_token_id
    rows = [[1, 5] + [img_tok] * side * side + [7, 8, 9], [1, 5] + [img_tok] * side * side + [7]]
    width = max(map(len, rows))
    pad = cfg.text_config.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left-padded: image blocks differ
    attention_mask = (input_ids != pad).long()
    pixel_values = torch.randn(2, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    with attnkit.attach(model, []) as handle, torch.no_grad(), handle.capture(queries="last") as cap:
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    return cap, input_ids == img_tok, side


def coco_image():
    from PIL import Image

    from attnkit.data import data_path

    folder = data_path("coco_tiny", "val2017")
    if not folder.is_dir():
        pytest.skip(f"no COCO images at {folder}")
    return Image.open(sorted(folder.glob("*.jpg"))[0]).convert("RGB")


def test_image_view_grid_equals_a_hand_reshape(vlm_capture, tmp_path):
    cap, image_mask, side = vlm_capture
    picture = coco_image()
    view = attention_view(cap, image=picture, image_tokens=image_mask, sample=1)
    payload = embedded(view.html())
    assert payload["mode"] == "image"
    positions = torch.nonzero(image_mask[1]).flatten().tolist()
    assert payload["image"]["positions"] == positions and payload["image"]["grid"] == [side, side]
    assert payload["image"]["src"].startswith("data:image/png;base64,") and max(payload["image"]["size"]) <= 384
    layer = max(e["layer"] for e in payload["layers"])
    last = view.query_positions[-1]
    for h in range(len(payload["heads"])):
        row = cap.last(layer)[1, h, 0]  # [K] of sample 1
        hand = row[image_mask[1]].reshape(side, side).numpy()
        got = stored_row(payload, layer, last, h)[positions].reshape(side, side)
        np.testing.assert_allclose(got, hand, **F16)
    # the page: the image block is one chip, and the canvas cells are the image tokens' values
    out = run_in_node(payload, [["layer", len(payload["layers"]) - 1], ["head", 2]], tmp_path)
    shown = out["snapshots"][-1]
    assert str(positions[0]) in shown["chips"] and str(positions[1]) not in shown["chips"]
    cells = np.asarray(shown["current"])[positions].reshape(side, side)
    np.testing.assert_allclose(cells, cap.last(layer)[1, 2, 0][image_mask[1]].reshape(side, side).numpy(), **F16)
    assert len(shown["fills"]) == side * side and "image tokens receive" in shown["readout"]
    assert [f[0] for f in shown["fills"]].count(payload["map_lut"][-1]) >= 1  # the hottest patch, darkest colour


def test_image_tokens_as_a_span_or_positions(vlm_capture):
    cap, image_mask, side = vlm_capture
    positions = torch.nonzero(image_mask[0]).flatten().tolist()
    span = attention_view(cap, image=np.zeros((8, 8, 3)), image_tokens=(positions[0], positions[-1] + 1))
    listed = attention_view(cap, image=np.zeros((8, 8, 3)), image_tokens=positions, grid=(side, side))
    assert span.payload["image"]["positions"] == listed.payload["image"]["positions"] == positions


# ---- diffusion cross-attention -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_capture():
    from attnkit.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    with attnkit.attach(pipe, []) as handle, handle.capture(component="denoiser", queries="all") as cap:
        image = pipe("a red cat", num_inference_steps=2, height=16, width=16, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images[0]
    ids = pipe.tokenizer("a red cat", padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    return cap, image, pipe.tokenizer.convert_ids_to_tokens(ids)


def test_cross_view_maps_equal_the_capture(sd_capture, tmp_path):
    cap, image, tokens = sd_capture
    view = attention_view(cap, tokens=tokens, image=image, sample=1, token_indices=[0, 1, 2, 3, 4], grid=(16, 16))
    payload = embedded(view.html())
    assert payload["mode"] == "cross" and payload["tokens"] == tokens[:5] and payload["key_index"] == [0, 1, 2, 3, 4]
    cross = [r for r in cap.records if r.kind == "cross"]
    steps = sorted({r.call for r in cross})
    assert payload["steps"] == steps and sorted(e["layer"] for e in payload["layers"]) == sorted({r.layer for r in cross})
    for rec in cross:
        n_lat = rec.probs.shape[2]
        side = int(n_lat ** 0.5)
        entry = next(e for e in payload["layers"] if e["layer"] == rec.layer)
        assert entry["grid"] == [side, side]  # 16x16 or the mid block's 8x8
        for h in (0, 5):
            for t in (1, 3):
                hand = rec.probs[1, h, :, t].reshape(side, side).numpy()
                np.testing.assert_allclose(stored_map(payload, rec.layer, steps.index(rec.call), h, t), hand, **F16)
    # the page: hover token 3, step 1, head 5; then the mean of the steps
    layer_index = next(i for i, e in enumerate(payload["layers"]) if e["grid"] == [8, 8])
    out = run_in_node(payload, [["hover", 3], ["layer", layer_index], ["step", 1], ["head", 5], ["step", -1]], tmp_path)
    by_step = {r.call: r for r in cross if r.layer == payload["layers"][layer_index]["layer"]}
    on_step1, on_mean = out["snapshots"][4], out["snapshots"][5]
    np.testing.assert_allclose(on_step1["current"], by_step[steps[1]].probs[1, 5, :, 3].numpy(), **F16)
    mean = torch.stack([by_step[s].probs[1, 5, :, 3] for s in steps]).mean(0)
    np.testing.assert_allclose(on_mean["current"], mean.numpy(), **F16)
    assert len(on_mean["fills"]) == 64 and "64 of 64" in on_mean["note"]


def test_cross_view_of_last_rows_greys_out_the_rest(sd_capture, tmp_path):
    from attnkit.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    with attnkit.attach(pipe, []) as handle, handle.capture(component="denoiser", queries="last") as cap:
        pipe("a red cat", num_inference_steps=1, height=16, width=16, output_type="np")
    view = attention_view(cap, sample=1)
    entry = next(e for e in view.payload["layers"] if e["grid"] == [16, 16])
    assert entry["rows"] == [255]  # only the last latent position was captured
    out = run_in_node(view.payload, [["hover", 2]], tmp_path)
    current = out["snapshots"][-1]["current"]
    assert current[:255] == [None] * 255 and current[255] is not None
    assert "1 of 256" in out["snapshots"][-1]["note"] and "not captured" in out["snapshots"][-1]["note"]


# ---- the page itself -----------------------------------------------------------------------------------------------
def test_the_standalone_file_works_offline(vlm_capture, tmp_path):
    cap, image_mask, _ = vlm_capture
    view = attention_view(cap, image=np.zeros((16, 16, 3)), image_tokens=image_mask, title="offline </script> test")
    path = view.save(tmp_path / "out" / "view.html")
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.count("<script") == 2
    assert not re.search(r"https?:|ftp:|//[a-z0-9.-]+\.[a-z]{2,}/", page, flags=re.I)  # no URL to fetch
    assert not re.search(r"<(link|iframe|img)\b|<script[^>]*\bsrc\s*=|@import|\burl\(", page)  # nothing loaded
    assert re.findall(r"\.src\s*=\s*(\w+)", page) == ["src"]  # the script's one picture source: the inline data URL
    assert embedded(page)["title"] == "offline </script> test"  # escaped inside the JSON, parsed back intact
    assert view._repr_html_().startswith('<div class="attnkit-view"')
    assert view._repr_html_() != view._repr_html_()  # each display gets its own element id


def test_embedded_size_of_a_30_layer_9_head_64_token_capture():
    """The size the brief asks for, measured: last rows of every layer vs every row (queries="all")."""
    n_layers, n_heads, n = 30, 9, 64
    gen = torch.Generator().manual_seed(0)
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    full = torch.softmax(torch.randn(n_layers, 1, n_heads, n, n, generator=gen).masked_fill(causal, -torch.inf), -1)

    def capture(queries, rows):
        cap = Capture(layers=None, heads=None, queries=queries)
        for layer in range(n_layers):
            cap.add(layer, 1, full[layer][:, :, rows], rows)
        return cap

    last = attention_view(capture("last", torch.tensor([n - 1])))
    every = attention_view(capture("all", torch.arange(n)))
    values_last, values_all = n_layers * n_heads * n, n_layers * n_heads * n * (n + 1) // 2  # causal triangle
    assert last.nbytes == pytest.approx(values_last * 2 * 4 / 3, rel=0.01)  # float16 in base64
    assert every.nbytes == pytest.approx(values_all * 2 * 4 / 3, rel=0.01)
    print(f"30x9x64: queries='last' {last.nbytes / 1024:.1f} KiB embedded ({len(last.html()) / 1024:.1f} KiB page); "
          f"queries='all' {every.nbytes / 1e6:.2f} MB embedded ({len(every.html()) / 1e6:.2f} MB page)")
    with pytest.raises(ValueError, match=r"would embed 1\.50 MB .* \(max_mb=1\.48\): choose fewer layers="):
        attention_view(capture("all", torch.arange(n)), max_mb=1.48)  # measured after trimming the causal rows
    with pytest.raises(ValueError, match=r"would embed at least 1\.47 MB .* \(max_mb=1\): choose fewer layers="):
        attention_view(capture("all", torch.arange(n)), max_mb=1.0)  # refused before encoding


def test_errors_name_what_to_change(all_rows, last_rows, vlm_capture):
    with pytest.raises(ValueError, match=r"tokens has 3 labels but the captured key axis has 7"):
        attention_view(all_rows, tokens=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"heads \[0\] were not captured \(captured heads: \[1, 3\]\)"):
        attention_view(all_rows, heads=[0])
    with pytest.raises(ValueError, match=r"layers \[5\] were not captured \(captured layers: \[0, 1\]\)"):
        attention_view(all_rows, layers=[5])
    with pytest.raises(ValueError, match=r"sample=2 is out of range: the captured batch has 1 rows"):
        attention_view(all_rows, sample=2)
    with pytest.raises(ValueError, match=r"image= needs image_tokens="):
        attention_view(all_rows, image=np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match=r"image_tokens= was given without image="):
        attention_view(all_rows, image_tokens=(1, 5))
    with pytest.raises(ValueError, match=r"this capture holds \['joint'\] .*not supported yet"):
        attention_view([CaptureRecord(0, 1, torch.ones(1, 1, 2, 2), kind="joint")])
    with pytest.raises(ValueError, match=r"image_tokens= is for self-attention captures"):
        attention_view([CaptureRecord(0, 1, torch.ones(1, 1, 4, 2), kind="cross")], image_tokens=(0, 1))
    cap, image_mask, _ = vlm_capture
    with pytest.raises(ValueError, match=r"grid=\(2, 3\) has 6 cells but image_tokens selects 16 tokens"):
        attention_view(cap, image=np.zeros((4, 4, 3)), image_tokens=image_mask, grid=(2, 3))
    with pytest.raises(ValueError, match=r"image_tokens selects 3 tokens, not a square number"):
        attention_view(cap, image=np.zeros((4, 4, 3)), image_tokens=(2, 5))
    with pytest.raises(ValueError, match=r"the capture holds no records"):
        attention_view(Capture(None, None))
    with pytest.raises(ValueError, match=r"calls \[99\] are not in the chosen forward pass"):
        attention_view(last_rows, calls=[99])


def test_repr_and_an_empty_page():
    view = AttentionView({"mode": "text", "title": "t", "layers": [], "heads": []})
    assert repr(view) == "AttentionView(mode='text', layers=0, heads=0, embedded=0.0 KiB)"
    recs = [CaptureRecord(layer, call, torch.ones(2, 1, 3, 4), kind="cross") for call in (1, 2, 2, 1) for layer in (0, 1)]
    passes = forward_passes(recs, growing_keys=False)  # diffusion: a step counter restart starts a new call
    assert [[r.call for r in p] for p in passes] == [[1, 1, 2, 2, 2, 2], [1, 1]]

"""The JavaScript and CSS of :mod:`attnkit.viz.interactive`, inlined into every page (no external file or URL).

The script defines ``attnkitView`` with pure functions (``decodeF16``, ``SelfModel``, ``CrossModel``: the
embedded data → rows and maps) and ``mount(root, payload)``, which builds the view into ``root`` and returns a
controller (``state``, ``current`` — the values on screen — and setters the DOM events call). Under node
(``module.exports``) the pure parts can be tested without a browser; ``mount`` only needs a small DOM subset
(createElement, appendChild, removeChild, firstChild, textContent, className, title, style, value,
addEventListener, canvas ``getContext("2d")``).
"""

SCRIPT = r"""
var attnkitView = (function () {
  "use strict";

  // ---- data: base64 float16 -> Float32Array ------------------------------------------------------------------
  function f16(h) {
    var s = (h & 0x8000) ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
    if (e === 0) return s * f * 5.960464477539063e-8;  // 2^-24: subnormal
    if (e === 31) return f ? NaN : s * Infinity;
    return s * (1 + f / 1024) * Math.pow(2, e - 15);
  }
  function decodeF16(b64) {
    var bin = atob(b64), n = bin.length >> 1, out = new Float32Array(n);
    for (var i = 0; i < n; i++) out[i] = f16(bin.charCodeAt(2 * i) | (bin.charCodeAt(2 * i + 1) << 8));
    return out;
  }

  // ---- text / image mode: rows stored per layer as [H, L_p] blocks, one per captured position ----------------
  function SelfModel(p) {
    this.p = p;
    this.nHeads = p.heads.length;
    this.nKeys = p.n_keys;
    this.cache = {};
  }
  SelfModel.prototype.layer = function (li) {
    if (!this.cache[li]) {
      var e = this.p.layers[li], off = [], o = 0, index = {};
      for (var i = 0; i < e.positions.length; i++) { off.push(o); o += this.nHeads * e.lengths[i]; index[e.positions[i]] = i; }
      this.cache[li] = { data: decodeF16(e.data), off: off, index: index, entry: e };
    }
    return this.cache[li];
  };
  SelfModel.prototype.positions = function (li) { return this.p.layers[li].positions; };
  SelfModel.prototype.has = function (li, pos) { return this.layer(li).index.hasOwnProperty(pos); };
  // row(li, pos, head): Float32Array over all keys (zeros past the stored length); head -1 = mean of the heads
  SelfModel.prototype.row = function (li, pos, head) {
    var L = this.layer(li), i = L.index[pos], out = new Float32Array(this.nKeys);
    if (i === undefined) return null;
    var len = L.entry.lengths[i], heads = head < 0 ? this.nHeads : 1;
    for (var h = 0; h < heads; h++) {
      var start = L.off[i] + (head < 0 ? h : head) * len;
      for (var k = 0; k < len; k++) out[k] += L.data[start + k] / heads;
    }
    return out;
  };

  // ---- cross mode: per layer and step a [H, R, T] block (R captured latent positions, T prompt tokens) -------
  function CrossModel(p) {
    this.p = p;
    this.nHeads = p.heads.length;
    this.nTokens = p.tokens.length;
    this.cache = {};
  }
  CrossModel.prototype.block = function (li, s) {
    var key = li + ":" + s;
    if (!(key in this.cache)) this.cache[key] = this.p.layers[li].data[s] ? decodeF16(this.p.layers[li].data[s]) : null;
    return this.cache[key];
  };
  // map(li, step, head, t): Float32Array over the h*w cells, NaN where no row was captured; step/head -1 = mean
  CrossModel.prototype.map = function (li, step, head, t) {
    var e = this.p.layers[li], R = e.rows.length, T = this.nTokens, out = new Float32Array(e.grid[0] * e.grid[1]);
    out.fill(NaN);
    var steps = [], heads = [];
    for (var s = 0; s < e.data.length; s++) if ((step < 0 || s === step) && e.data[s]) steps.push(s);
    for (var h = 0; h < this.nHeads; h++) if (head < 0 || h === head) heads.push(h);
    if (!steps.length) return out;
    for (var r = 0; r < R; r++) {
      var acc = 0;
      for (var a = 0; a < steps.length; a++) {
        var d = this.block(li, steps[a]);
        for (var b = 0; b < heads.length; b++) acc += d[(heads[b] * R + r) * T + t];
      }
      out[e.rows[r]] = acc / (steps.length * heads.length);
    }
    return out;
  };
  // share(li, step, head): per token, the mean over captured latent positions (each row sums to 1 over tokens)
  CrossModel.prototype.share = function (li, step, head) {
    var out = new Float32Array(this.nTokens);
    for (var t = 0; t < this.nTokens; t++) {
      var m = this.map(li, step, head, t), n = 0, acc = 0;
      for (var i = 0; i < m.length; i++) if (!isNaN(m[i])) { acc += m[i]; n++; }
      out[t] = n ? acc / n : 0;
    }
    return out;
  };

  // ---- small DOM helpers ----------------------------------------------------------------------------------
  function el(parent, tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }
  function select(parent, label, options, onChange) {
    var wrap = el(parent, "label", "akv-ctl", label + " ");
    var s = el(wrap, "select");
    options.forEach(function (o) { var op = el(s, "option", null, o[1]); op.value = String(o[0]); });
    s.addEventListener("change", function () { onChange(parseInt(s.value, 10)); });
    return s;
  }
  function colour(lut, t) {
    if (!(t >= 0)) t = 0;
    return lut[Math.min(lut.length - 1, Math.floor(Math.min(t, 1) * (lut.length - 1) + 0.5))];
  }
  function fmt(v) { return v >= 0.001 || v === 0 ? v.toFixed(3) : v.toExponential(1); }
  function maxOf(a, from) {
    var m = 0;
    for (var i = from || 0; i < a.length; i++) if (a[i] > m) m = a[i];
    return m;
  }
  function legend(parent, lut) {
    var box = el(parent, "div", "akv-legend");
    var lo = el(box, "span", null, "0");
    var bar = el(box, "span", "akv-bar");
    bar.style.background = "linear-gradient(to right," + lut.join(",") + ")";
    var hi = el(box, "span", null, "");
    return { set: function (vmax, what) { hi.textContent = fmt(vmax) + (what ? " " + what : ""); } };
  }
  function loadPicture(src, onload) {
    if (!src || typeof Image === "undefined") return null;
    var img = new Image();
    img.onload = onload;
    img.src = src;
    return img;
  }
  // Draw a [h, w] grid of values (NaN: not captured) on a canvas, over the picture when there is one.
  function drawGrid(canvas, picture, grid, values, vmax, lut) {
    var ctx = canvas.getContext && canvas.getContext("2d");
    if (!ctx) return;
    var W = canvas.width, H = canvas.height, h = grid[0], w = grid[1];
    ctx.clearRect(0, 0, W, H);
    if (picture && picture.complete && picture.naturalWidth) ctx.drawImage(picture, 0, 0, W, H);
    ctx.globalAlpha = picture ? 0.6 : 1.0;
    for (var r = 0; r < h; r++) for (var c = 0; c < w; c++) {
      var v = values[r * w + c];
      var x0 = Math.floor(c * W / w), y0 = Math.floor(r * H / h);
      var x1 = Math.floor((c + 1) * W / w), y1 = Math.floor((r + 1) * H / h);
      if (isNaN(v)) {
        ctx.fillStyle = "#bbbbbb";
        ctx.globalAlpha = 0.35;
        ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
        ctx.globalAlpha = picture ? 0.6 : 1.0;
      } else {
        ctx.fillStyle = colour(lut, vmax > 0 ? v / vmax : 0);
        ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
      }
    }
    ctx.globalAlpha = 1.0;
  }
  function canvasFor(parent, grid, size) {
    var c = el(parent, "canvas", "akv-canvas");
    var aspect = size ? size[1] / size[0] : grid[0] / grid[1];
    c.width = 320;
    c.height = Math.max(1, Math.round(320 * aspect));
    return c;
  }
  function cellAt(canvas, grid, ev) {
    var rect = canvas.getBoundingClientRect ? canvas.getBoundingClientRect() : { left: 0, top: 0, width: canvas.width, height: canvas.height };
    var x = (ev.clientX - rect.left) / rect.width, y = (ev.clientY - rect.top) / rect.height;
    if (!(x >= 0 && x < 1 && y >= 0 && y < 1)) return null;
    return [Math.floor(y * grid[0]), Math.floor(x * grid[1])];
  }
  function capturedWith(p) {
    return p.queries === "last" || p.queries === "all" ? "queries=\"" + p.queries + "\"" : "a selection of query rows";
  }
  function headOptions(p) {
    var o = [[-1, "mean of " + p.heads.length + " heads"]];
    p.heads.forEach(function (h, i) { o.push([i, "head " + h]); });
    return o;
  }
  function header(root, p) {
    clear(root);
    el(root, "div", "akv-title", p.title);
    return el(root, "div", "akv-controls");
  }

  // ---- text / image mode ----------------------------------------------------------------------------------
  function mountSelf(root, p) {
    var model = new SelfModel(p), img = p.image || null;
    var imagePos = img ? img.positions : [], isImage = {};
    imagePos.forEach(function (q) { isImage[q] = true; });
    var last = model.positions(0);
    var state = { layer: 0, head: -1, query: last[last.length - 1], pinned: false, skipFirst: false };
    var ctl = { state: state, model: model, current: null, chips: {} };

    var controls = header(root, p);
    select(controls, "layer", p.layers.map(function (l, i) { return [i, String(l.layer)]; }),
           function (v) { ctl.setLayer(v); });
    select(controls, "head", headOptions(p), function (v) { ctl.setHead(v); });
    var skipWrap = el(controls, "label", "akv-ctl");
    var skip = el(skipWrap, "input");
    skip.type = "checkbox";
    el(skipWrap, "span", null, " colour scale without key 0 (the sink)");
    skip.addEventListener("change", function () { state.skipFirst = !!skip.checked; ctl.render(); });

    var note = el(root, "div", "akv-note");
    var readout = el(root, "div", "akv-readout", "");
    var strip = el(root, "div", "akv-strip");
    var stripLegend = legend(root, p.strip_lut);
    var panel = null, canvas = null, picture = null, mapLegend = null;
    if (img) {
      panel = el(root, "div", "akv-panel");
      canvas = canvasFor(panel, img.grid, img.size);
      mapLegend = legend(panel, p.map_lut);
      picture = loadPicture(img.src, function () { ctl.render(); });
    }

    for (var i = 0; i < p.tokens.length; i++) {
      if (isImage[i] && i !== imagePos[0]) continue;
      var chip = el(strip, "span", "akv-tok", isImage[i] ? "[image " + img.grid[0] + "\u00d7" + img.grid[1] + "]" : p.tokens[i]);
      chip.addEventListener("mouseenter", (function (k) { return function () { ctl.hover(k); }; })(i));
      chip.addEventListener("click", (function (k) { return function () { ctl.click(k); }; })(i));
      ctl.chips[i] = chip;
    }
    if (canvas) {
      canvas.addEventListener("mousemove", function (ev) {
        var cell = cellAt(canvas, img.grid, ev);
        if (!cell || !ctl.current) return;
        var pos = imagePos[cell[0] * img.grid[1] + cell[1]];
        readout.textContent = "image patch (" + cell[0] + ", " + cell[1] + ") = key #" + pos + ": " + fmt(ctl.current[pos]);
      });
    }

    ctl.label = function (k) { return isImage[k] ? "image token " + imagePos.indexOf(k) : "'" + p.tokens[k] + "'"; };
    ctl.setLayer = function (li) {
      state.layer = li;
      if (!model.has(li, state.query)) { var ps = model.positions(li); state.query = ps[ps.length - 1]; }
      ctl.render();
    };
    ctl.setHead = function (h) { state.head = h; ctl.render(); };
    ctl.setQuery = function (pos) { if (model.has(state.layer, pos)) { state.query = pos; ctl.render(); } };
    ctl.hover = function (k) {
      if (!state.pinned && model.has(state.layer, k)) ctl.setQuery(k);
      else ctl.describe(k);
    };
    ctl.click = function (k) {
      if (!model.has(state.layer, k)) { readout.textContent = "token #" + k + " " + ctl.label(k) + " was not captured as a query: its row is not in the capture"; return; }
      state.pinned = !(state.pinned && state.query === k);
      ctl.setQuery(k);
    };
    ctl.describe = function (k) {
      var v = isImage[k] ? ctl.imageMass : ctl.current[k];
      readout.textContent = "query #" + state.query + " " + ctl.label(state.query) + " \u2192 " +
        (isImage[k] ? "the " + imagePos.length + " image tokens: " : "key #" + k + " " + ctl.label(k) + ": ") + fmt(v);
    };
    ctl.render = function () {
      var row = model.row(state.layer, state.query, state.head);
      ctl.current = row;
      var vmax = maxOf(row, state.skipFirst ? 1 : 0), imageMass = 0, imageMax = 0;
      imagePos.forEach(function (q) { imageMass += row[q]; if (row[q] > imageMax) imageMax = row[q]; });
      ctl.imageMass = imageMass;
      for (var k in ctl.chips) {
        var chip = ctl.chips[k], v = isImage[k] ? imageMass : row[k], t = vmax > 0 ? v / vmax : 0;
        chip.style.background = colour(p.strip_lut, t);
        chip.style.color = t > 0.55 ? "#ffffff" : "#111111";
        chip.className = "akv-tok" + (model.has(state.layer, +k) ? " akv-sel" : "") + (+k === state.query ? " akv-query" : "");
        chip.title = "#" + k + " " + ctl.label(+k) + ": " + fmt(v) + (model.has(state.layer, +k) ? " (click to pin its row)" : " (not captured as a query)");
      }
      stripLegend.set(vmax, state.skipFirst ? "(key 0 not counted)" : "");
      var peak = 0;
      for (var j = 1; j < row.length; j++) if (row[j] > row[peak]) peak = j;
      readout.textContent = (state.pinned ? "pinned " : "") + "query #" + state.query + " " + ctl.label(state.query) +
        " \u00b7 layer " + p.layers[state.layer].layer + " \u00b7 " + (state.head < 0 ? "mean of heads" : "head " + p.heads[state.head]) +
        " \u2014 max " + fmt(row[peak]) + " on #" + peak + " " + ctl.label(peak) +
        (img ? "; image tokens receive " + (100 * imageMass).toFixed(1) + "%" : "");
      if (canvas) {
        var cells = new Float32Array(imagePos.length);
        imagePos.forEach(function (q, c) { cells[c] = row[q]; });
        ctl.cells = cells;
        drawGrid(canvas, picture, img.grid, cells, imageMax, p.map_lut);
        mapLegend.set(imageMax, "(attention on one patch)");
      }
      var n = model.positions(state.layer).length;
      note.textContent = "Selectable queries (underlined): " + n + " of " + p.tokens.length + " tokens " +
        "(captured with " + capturedWith(p) + "). " +
        (n < p.tokens.length ? "The other tokens' rows were not captured, so they cannot be selected; capture with " +
         "handle.capture(queries=\"all\") or a list of positions to see them. " : "") +
        "Hover a query to see its row, click to pin it (then hover keys to read their values)." +
        (p.note ? " " + p.note + "." : "");
    };
    ctl.render();
    return ctl;
  }

  // ---- cross mode -----------------------------------------------------------------------------------------
  function mountCross(root, p) {
    var model = new CrossModel(p);
    var state = { layer: 0, step: -1, head: -1, token: 0, pinned: false };
    var ctl = { state: state, model: model, current: null, chips: {} };
    var controls = header(root, p);
    select(controls, "layer", p.layers.map(function (l, i) { return [i, l.layer + " (" + l.grid[0] + "\u00d7" + l.grid[1] + ")"]; }),
           function (v) { ctl.setLayer(v); });
    var stepOptions = [[-1, "mean of " + p.steps.length + " steps"]];
    p.steps.forEach(function (c, i) { stepOptions.push([i, "step " + i + " (call " + c + ")"]); });
    select(controls, "step", stepOptions, function (v) { ctl.setStep(v); });
    select(controls, "head", headOptions(p), function (v) { ctl.setHead(v); });
    var note = el(root, "div", "akv-note");
    var readout = el(root, "div", "akv-readout", "");
    var strip = el(root, "div", "akv-strip");
    var stripLegend = legend(root, p.strip_lut);
    var panel = el(root, "div", "akv-panel");
    var size = p.image ? p.image.size : null;
    var canvas = canvasFor(panel, p.layers[0].grid, size);
    var mapLegend = legend(panel, p.map_lut);
    var picture = loadPicture(p.image ? p.image.src : null, function () { ctl.render(); });
    p.tokens.forEach(function (tok, t) {
      var chip = el(strip, "span", "akv-tok akv-sel", tok);
      chip.addEventListener("mouseenter", function () { if (!state.pinned) ctl.setToken(t); });
      chip.addEventListener("click", function () { state.pinned = !(state.pinned && state.token === t); ctl.setToken(t); });
      ctl.chips[t] = chip;
    });
    canvas.addEventListener("mousemove", function (ev) {
      var grid = p.layers[state.layer].grid, cell = cellAt(canvas, grid, ev);
      if (!cell || !ctl.current) return;
      var v = ctl.current[cell[0] * grid[1] + cell[1]];
      readout.textContent = "'" + p.tokens[state.token] + "' at latent cell (" + cell[0] + ", " + cell[1] + "): " +
        (isNaN(v) ? "not captured" : fmt(v));
    });
    ctl.setLayer = function (li) { state.layer = li; ctl.render(); };
    ctl.setStep = function (s) { state.step = s; ctl.render(); };
    ctl.setHead = function (h) { state.head = h; ctl.render(); };
    ctl.setToken = function (t) { state.token = t; ctl.render(); };
    ctl.render = function () {
      var e = p.layers[state.layer], share = model.share(state.layer, state.step, state.head);
      ctl.share = share;
      var smax = maxOf(share, 0);
      for (var t = 0; t < p.tokens.length; t++) {
        var chip = ctl.chips[t], u = smax > 0 ? share[t] / smax : 0;
        chip.style.background = colour(p.strip_lut, u);
        chip.style.color = u > 0.55 ? "#ffffff" : "#111111";
        chip.className = "akv-tok akv-sel" + (t === state.token ? " akv-query" : "");
        chip.title = "'" + p.tokens[t] + "' (key " + p.key_index[t] + "): mean attention " + fmt(share[t]);
      }
      stripLegend.set(smax, "(mean over latent positions)");
      var m = model.map(state.layer, state.step, state.head, state.token), vmax = 0, captured = 0;
      for (var i = 0; i < m.length; i++) if (!isNaN(m[i])) { captured++; if (m[i] > vmax) vmax = m[i]; }
      ctl.current = m;
      drawGrid(canvas, picture, e.grid, m, vmax, p.map_lut);
      mapLegend.set(vmax, "(this token's map)");
      readout.textContent = (state.pinned ? "pinned " : "") + "token '" + p.tokens[state.token] + "' \u00b7 layer " + e.layer +
        " (" + e.grid[0] + "\u00d7" + e.grid[1] + ") \u00b7 " + (state.step < 0 ? "mean of steps" : "step " + state.step) +
        " \u00b7 " + (state.head < 0 ? "mean of heads" : "head " + p.heads[state.head]) + " \u2014 mean " + fmt(share[state.token]) +
        ", max " + fmt(vmax);
      note.textContent = "Latent positions captured in this layer: " + captured + " of " + m.length +
        " (captured with " + capturedWith(p) + ")" +
        (captured < m.length ? "; the grey cells' rows were not captured (capture with queries=\"all\": for cross-attention " +
         "that is latent positions \u00d7 prompt tokens, not N\u00b2)" : "") +
        ". Hover a prompt token to see its map, click to pin it." + (p.note ? " " + p.note + "." : "");
    };
    var s0 = model.share(0, -1, -1), best = 0;
    for (var t = 1; t < s0.length; t++) if (best === 0 || s0[t] > s0[best]) best = t;
    state.token = best;
    ctl.render();
    return ctl;
  }

  function mount(root, p) {
    if (!p.layers || !p.layers.length) { clear(root); el(root, "div", "akv-note", "attnkit attention view: nothing captured"); return null; }
    var ctl = p.mode === "cross" ? mountCross(root, p) : mountSelf(root, p);
    root.attnkit = ctl;
    return ctl;
  }

  var lib = { f16: f16, decodeF16: decodeF16, SelfModel: SelfModel, CrossModel: CrossModel, mount: mount };
  if (typeof module !== "undefined" && module.exports) module.exports = lib;
  return lib;
})();
"""

STYLE = """
.attnkit-view { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; font-size: 13px; color: #111;
  max-width: 980px; margin: 6px 0; }
.attnkit-view .akv-title { font-weight: 600; margin-bottom: 4px; }
.attnkit-view .akv-controls { display: flex; flex-wrap: wrap; gap: 12px; margin-bottom: 4px; }
.attnkit-view .akv-ctl select { font-size: 12px; }
.attnkit-view .akv-note { color: #555; font-size: 12px; margin: 2px 0 4px 0; }
.attnkit-view .akv-readout { font-family: Menlo, Consolas, monospace; font-size: 12px; min-height: 1.4em;
  margin: 2px 0 6px 0; }
.attnkit-view .akv-strip { line-height: 2.1; }
.attnkit-view .akv-tok { display: inline-block; padding: 0 4px; margin: 1px; border-radius: 3px;
  border: 1px solid #ddd; cursor: default; white-space: pre; font-family: Menlo, Consolas, monospace; font-size: 12px;
  line-height: 1.6; }
.attnkit-view .akv-tok.akv-sel { cursor: pointer; text-decoration: underline dotted; }
.attnkit-view .akv-tok.akv-query { outline: 2px solid #d62728; outline-offset: 0; }
.attnkit-view .akv-legend { display: flex; align-items: center; gap: 6px; font-size: 11px; color: #555;
  margin: 4px 0; }
.attnkit-view .akv-bar { display: inline-block; width: 140px; height: 10px; border: 1px solid #ccc; }
.attnkit-view .akv-panel { margin-top: 6px; }
.attnkit-view .akv-canvas { width: 320px; border: 1px solid #ccc; image-rendering: pixelated; }
"""

// A minimal DOM for running attnkit's view script under node (no browser here): elements with children, text,
// style, listeners and a recording canvas context. Usage:
//   node fake_dom.js SCRIPT.js PAYLOAD.json ACTIONS.json
// ACTIONS is a list of [what, arg] applied in order; after each one the values on screen are recorded:
//   ["hover", key] / ["click", key]  -> mouseenter / click on the chip of token `key`
//   ["layer", i] / ["head", i] / ["step", i] -> choose option i (index into the payload's lists; -1 = mean)
// It prints JSON: {"snapshots": [{state, current, readout, note, chips: {key: [background, title]}, fills}], ...}
"use strict";
const fs = require("fs");

class El {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.children = [];
    this.style = {};
    this.listeners = {};
    this.className = "";
    this.title = "";
    this._text = "";
    this.value = "";
    this.checked = false;
    this.width = 300;
    this.height = 150;
    this.ops = [];
  }
  appendChild(c) { this.children.push(c); c.parentNode = this; return c; }
  removeChild(c) { this.children.splice(this.children.indexOf(c), 1); c.parentNode = null; return c; }
  get firstChild() { return this.children[0] || null; }
  set textContent(t) { this.children = []; this._text = String(t); }
  get textContent() { return this._text + this.children.map((c) => c.textContent).join(""); }
  addEventListener(type, fn) { (this.listeners[type] = this.listeners[type] || []).push(fn); }
  fire(type, ev) { (this.listeners[type] || []).forEach((fn) => fn(ev || {})); }
  getContext(kind) {
    if (this.tagName !== "CANVAS" || kind !== "2d") return null;
    const ops = this.ops, ctx = { fillStyle: "", globalAlpha: 1 };
    ctx.clearRect = () => ops.splice(0, ops.length);
    ctx.fillRect = (x, y, w, h) => ops.push([ctx.fillStyle, ctx.globalAlpha, x, y, w, h]);
    ctx.drawImage = () => ops.push(["image"]);
    return ctx;
  }
  all(pred, out = []) {
    if (pred(this)) out.push(this);
    this.children.forEach((c) => c.all(pred, out));
    return out;
  }
}
global.document = { createElement: (tag) => new El(tag) };

const [scriptPath, payloadPath, actionsPath] = process.argv.slice(2);
const lib = require(scriptPath);
const payload = JSON.parse(fs.readFileSync(payloadPath, "utf8"));
const actions = JSON.parse(fs.readFileSync(actionsPath, "utf8"));
const root = new El("div");
const ctl = lib.mount(root, payload);
const selects = root.all((e) => e.tagName === "SELECT");
const byClass = (cls) => root.all((e) => e.className.split(" ").includes(cls));
const canvas = root.all((e) => e.tagName === "CANVAS")[0];

function snapshot() {
  const chips = {};
  for (const k in ctl.chips) chips[k] = [ctl.chips[k].style.background, ctl.chips[k].title];
  return {
    state: Object.assign({}, ctl.state),
    current: Array.from(ctl.current, (v) => (Number.isNaN(v) ? null : v)),
    readout: byClass("akv-readout")[0].textContent,
    note: byClass("akv-note")[0].textContent,
    chips: chips,
    fills: canvas ? canvas.ops.filter((op) => op[0] !== "image") : null,
  };
}

const names = { layer: "layer", head: "head", step: "step" };
const snapshots = [snapshot()];
for (const [what, arg] of actions) {
  if (what === "hover") ctl.chips[arg].fire("mouseenter");
  else if (what === "click") ctl.chips[arg].fire("click");
  else if (what in names) {
    const sel = selects.find((s) => s.parentNode.textContent.startsWith(names[what]));
    sel.value = String(arg);
    sel.fire("change");
  } else throw new Error("unknown action " + what);
  snapshots.push(snapshot());
}
process.stdout.write(JSON.stringify({
  snapshots: snapshots,
  selects: selects.map((s) => s.children.map((o) => o.textContent)),
  decoded: payload.layers.length && typeof payload.layers[0].data === "string"
    ? Array.from(lib.decodeF16(payload.layers[0].data)) : null,
}));

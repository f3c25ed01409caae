// Run a report's inline script in Node against a minimal fake DOM: catches syntax and runtime
// errors and counts what the page built (cards, SVG shapes). Usage: node fake_dom.js page.html
"use strict";
const fs = require("fs");
const htmlText = fs.readFileSync(process.argv[2], "utf8");
const dataMatch = htmlText.match(/<script type="application\/json" id="data">([\s\S]*?)<\/script>/);
const scripts = [...htmlText.matchAll(/<script>([\s\S]*?)<\/script>/g)].map(m => m[1]);
if (!dataMatch || scripts.length !== 1) { console.log(JSON.stringify({error: "page structure"})); process.exit(1); }
const counts = {};
class Node_ {
  constructor(tag) { this.tagName = tag; this.children = []; this.attrs = {}; this._text = ""; this.listeners = {}; this.className = ""; this.disabled = false; }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  appendChild(c) { this.children.push(c); return c; }
  addEventListener(t, f) { this.listeners[t] = f; }
  set textContent(v) { this._text = String(v); this.children = []; }
  get textContent() { return this._text + this.children.map(c => c.textContent).join(""); }
  get innerHTML() { throw new Error("innerHTML used"); }
  set innerHTML(v) { throw new Error("innerHTML used"); }
  get offsetTop() { return 0; }
  getContext() { const n = () => { counts.draw = (counts.draw || 0) + 1; }; return {beginPath() {}, arc: n, fill() {}, set fillStyle(v) {}}; }
}
const byId = {};
for (const m of htmlText.matchAll(/ id="([^"]+)"/g)) if (m[1] !== "data") byId[m[1]] = new Node_("div");
byId["data"] = { textContent: dataMatch[1] }; // as a browser gives it: the raw text; JSON.parse decodes the escapes
const document = {
  getElementById: id => byId[id],
  createElement: tag => { counts[tag] = (counts[tag] || 0) + 1; return new Node_(tag); },
  createElementNS: (ns, tag) => { counts[tag] = (counts[tag] || 0) + 1; return new Node_(tag); },
};
const window = { scrollTo() {} };
new Function("document", "window", scripts[0])(document, window);
const cards = byId["cards"].children.length;
// click to page 2 when there is one
const b = byId["pager"].children[1];
if (b) b.listeners.click();
const kids = id => (byId[id] ? byId[id].children.length : null);
console.log(JSON.stringify({ok: true, cards, cardsAfterClick: byId["cards"].children.length, counts,
  changes: kids("changes"), along: kids("along"), universality: kids("uni"),
  changesShown: byId["changes-row"] ? byId["changes-row"].hidden === false : null,
  title: byId["title"].textContent, cardsText: byId["cards"].textContent.slice(0, 20000)}));

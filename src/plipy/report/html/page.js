/* plipy report: draws the plotly figures, the token views and the detail panels from the inlined data, and links
   clicks on figures to them. No network, no external code: plotly.js is inlined before this script. */
(function () {
  "use strict";
  window.plipyStartMs = performance.now();  // plotly.js is parsed and run by now: the rest is drawing
  var DATA = JSON.parse(document.getElementById("plipy-data").textContent);
  var components = {};

  function fmt(x) {
    if (x === null || x === undefined || !isFinite(x)) return "—";
    if (x !== 0 && Math.abs(x) < 1e-3) return x.toExponential(2);
    return x.toPrecision(4);
  }

  // Little-endian float32 rows (every browser this page targets is little-endian).
  function f32(b64) {
    var s = atob(b64), u = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return new Float32Array(u.buffer);
  }

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined) e.textContent = text;
    return e;
  }

  // ---------------------------------------------------------------------------------------------- token view
  function TokenView(root, p) {
    var state = { sample: p.initial.sample, layer: p.initial.layer, head: p.initial.head, zero: false };
    var rowsCache = {};
    var controls = el("div", { "class": "tv-controls" });
    var sampleSel = el("select", { "class": "tv-sample", "aria-label": "sample" });
    p.samples.forEach(function (s, i) { sampleSel.appendChild(el("option", { value: i }, s.id + " (" + s.group + ")")); });
    var slider = el("input", { "class": "tv-layer", type: "range", min: 0, max: p.layers.length - 1, step: 1,
                               "aria-label": "layer" });
    var layerLabel = el("span", { "class": "tv-layer-label" });
    var headSel = el("select", { "class": "tv-head", "aria-label": "head" });
    headSel.appendChild(el("option", { value: "mean" }, "mean of heads " + compact(p.metric_heads)));
    for (var h = 0; h < p.n_heads; h++) headSel.appendChild(el("option", { value: h }, "head " + h));
    var zeroBox = el("input", { "class": "tv-zero", type: "checkbox" });
    var zeroLabel = el("label", {}, " scale includes token 0");
    zeroLabel.prepend(zeroBox);
    [el("span", {}, "sample "), sampleSel, el("span", {}, " layer "), slider, layerLabel, el("span", {}, " "),
     headSel, el("span", {}, " "), zeroLabel].forEach(function (c) { controls.appendChild(c); });
    var info = el("div", { "class": "tv-info" });
    // the colour scale: a token's background is its weight relative to the scale's top
    var legend = el("div", { "class": "tv-legend" });
    var legendLow = el("span", {}, "0"), legendBar = el("span", { "class": "tv-legend-bar" });
    var legendHigh = el("span", {}), legendNote = el("span", { "class": "tv-legend-note" });
    [el("span", {}, "attention weight "), legendLow, legendBar, legendHigh, legendNote]
      .forEach(function (c) { legend.appendChild(c); });
    var text = el("div", { "class": "tv-text" });
    var bars = el("div", { "class": "tv-bars plot" });
    [controls, info, legend, text, bars].forEach(function (c) { root.appendChild(c); });

    function compact(hs) {
      if (hs.length > 1 && hs[hs.length - 1] - hs[0] === hs.length - 1) return hs[0] + "–" + hs[hs.length - 1];
      return hs.join(",");
    }

    function rows(i) {
      if (!rowsCache[i]) rowsCache[i] = f32(p.samples[i].rows);
      return rowsCache[i];
    }

    // The marker row at the current layer: one head, or the mean of the metric's heads (in float64).
    function weights() {
      var s = p.samples[state.sample], r = rows(state.sample), K = s.keys, H = p.n_heads;
      var li = p.layers.indexOf(state.layer), out = new Array(K);
      var heads = state.head === "mean" ? p.metric_heads : [state.head];
      for (var k = 0; k < K; k++) {
        var acc = 0;
        for (var j = 0; j < heads.length; j++) acc += r[(li * H + heads[j]) * K + k];
        out[k] = acc / heads.length;
      }
      return out;
    }

    function render() {
      var s = p.samples[state.sample], w = weights(), m = s.marker;
      var li = p.layers.indexOf(state.layer);
      sampleSel.value = state.sample;
      slider.value = li;
      layerLabel.textContent = String(state.layer);
      headSel.value = String(state.head);
      var top = 0;
      for (var k = state.zero ? 0 : 1; k <= m; k++) top = Math.max(top, w[k]);
      if (!(top > 0)) top = 1;
      var targets = new Set(s.targets), after = new Set(s.after), frag = document.createDocumentFragment();
      s.tokens.forEach(function (tok, i) {
        var cls = "tok" + (i === m ? " marker" : "") + (targets.has(i) ? " target" : "") +
                  (i > m ? " after" : "") + (after.has(i) ? " target-after" : "");
        var shown = tok.replace(/\n/g, "\u21b5\n");
        var span = el("span", { "class": cls, "data-i": i }, shown === "" ? "\u2205" : shown);
        if (i <= m) {
          var a = Math.min(1, w[i] / top);
          span.style.backgroundColor = "rgba(230,85,13," + a.toFixed(3) + ")";
          span.setAttribute("data-w", String(w[i]));
          span.title = "#" + i + " " + JSON.stringify(tok) + "  weight " + fmt(w[i]);
        } else {
          span.title = "#" + i + " " + JSON.stringify(tok) + " (after the marker)";
        }
        frag.appendChild(span);
      });
      text.replaceChildren(frag);
      legendHigh.textContent = fmt(top);
      legendNote.textContent = !state.zero && w[0] > top ? "  (token 0: " + fmt(w[0]) + ", beyond the scale)" : "";
      // the caption's number is what is shown: the metric's head mean, or this one head's mean over the targets
      var metric = null, what = p.value_name + " (head mean over targets)";
      if (state.head === "mean") {
        metric = s.values ? s.values[li] : null;
      } else if (s.targets.length) {
        metric = s.targets.reduce(function (acc, t) { return acc + w[t]; }, 0) / s.targets.length;
        what = "head " + state.head + "'s attention, mean over targets";
      }
      info.textContent = s.id + " (" + s.group + ") — layer " + state.layer + ", " +
        (state.head === "mean" ? "mean of heads " + compact(p.metric_heads) : "head " + state.head) +
        "; token 0 holds " + fmt(w[0]) + "; uniform null 1/(m+1) = " + fmt(1 / (m + 1)) +
        (metric !== null ? "; " + what + " = " + fmt(metric) : "");
      var xs = s.targets.map(function (t, j) { return j + 1 + ". #" + t + " " + JSON.stringify(s.tokens[t]); });
      var ys = s.targets.map(function (t) { return w[t]; });
      Plotly.react(bars, [{ type: "bar", x: xs, y: ys, marker: { color: "#2ca02c" },
                            hovertemplate: "%{x}<br>weight %{y:.4g}<extra></extra>" }],
                   { template: DATA.template, height: 240, margin: { l: 55, r: 10, t: 30, b: 70 },
                     font: { size: 10 }, title: { text: "weight on each target", font: { size: 12 }, x: 0.01 },
                     yaxis: { rangemode: "tozero", title: { text: "attention" } },
                     shapes: [{ type: "line", xref: "paper", x0: 0, x1: 1, y0: 1 / (m + 1), y1: 1 / (m + 1),
                                line: { dash: "dash", color: "grey", width: 1 } }] }, DATA.config);
      root.dataset.sample = s.id;
      root.dataset.layer = state.layer;
      root.dataset.head = state.head;
    }

    sampleSel.addEventListener("change", function () { state.sample = +sampleSel.value; render(); });
    slider.addEventListener("input", function () { state.layer = p.layers[+slider.value]; render(); });
    headSel.addEventListener("change", function () {
      state.head = headSel.value === "mean" ? "mean" : +headSel.value; render();
    });
    zeroBox.addEventListener("change", function () { state.zero = zeroBox.checked; render(); });
    render();
    return {
      set: function (o) {
        if (o.sample !== undefined && p.samples[o.sample]) state.sample = o.sample;
        if (o.layer !== undefined && p.layers.indexOf(o.layer) >= 0) state.layer = o.layer;
        if (o.head !== undefined) state.head = o.head;
        render();
        root.classList.remove("flash"); void root.offsetWidth; root.classList.add("flash");
      }
    };
  }

  // ---------------------------------------------------------------------------------------------- detail panel
  function Detail(root, p) {
    function show(key) {
      if (!(key in p.panels)) return;
      root.innerHTML = p.panels[key];
      root.dataset.key = key;
    }
    show(p.initial);
    return { set: function (o) { if (o.key !== undefined) show(String(o.key)); root.classList.remove("flash");
                                 void root.offsetWidth; root.classList.add("flash"); } };
  }

  // ---------------------------------------------------------------------------------------------- figures
  function link(gd, click) {
    gd.on("plotly_click", function (ev) {
      var pt = ev.points && ev.points[0], target = components[click.target];
      if (!pt || !target || pt.customdata === undefined || pt.customdata === null) return;
      var cd = Array.isArray(pt.customdata) ? pt.customdata : [pt.customdata], o = {};
      click.fields.forEach(function (f, i) { if (cd[i] !== null && cd[i] !== undefined) o[f] = cd[i]; });
      target.set(o);
    });
  }

  function start() {
    Object.keys(DATA.tokens).forEach(function (id) { components[id] = TokenView(document.getElementById(id), DATA.tokens[id]); });
    Object.keys(DATA.details).forEach(function (id) { components[id] = Detail(document.getElementById(id), DATA.details[id]); });
    var drawn = Object.keys(DATA.figures).map(function (id) {
      var f = DATA.figures[id], gd = document.getElementById(id);
      f.layout.template = DATA.template;
      return Plotly.newPlot(gd, f.data, f.layout, DATA.config).then(function () {
        if (f.click && f.click.target) { link(gd, f.click); gd.classList.add("clickable"); }
      });
    });
    Promise.all(drawn).then(function () {
      window.plipyReadyMs = performance.now();
      document.body.dataset.ready = "1";
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start); else start();
})();

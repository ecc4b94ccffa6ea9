/* flightlog ui: charts (uPlot), zoom re-queries, partial loads and live run rows.
   Every value from the server is inserted as text or as server-escaped HTML fragments. */
(function () {
  "use strict";
  var base = (document.querySelector('meta[name="fl-base"]') || {}).content || "";
  var COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];
  window.flCharts = [];

  function getJSON(u) {
    return fetch(u, { credentials: "same-origin" }).then(function (r) {
      return r.json().then(function (j) {
        if (!r.ok) throw new Error((j && j.detail) || ("HTTP " + r.status));
        return j;
      });
    });
  }

  function seriesURL(s, x, points, lo, hi) {
    var q = new URLSearchParams({ run: s.run, name: s.name, points: String(points), x: x });
    if (lo != null) q.set("lo", String(lo));
    if (hi != null) q.set("hi", String(hi));
    return base + "/api/series?" + q.toString();
  }

  // Merge several (x sorted) series into uPlot's columnar layout. Unlike uPlot.join this keeps
  // repeated x values (e.g. many batches per epoch), so no downsampled extreme is collapsed.
  function merge(parts) {
    var rows = [];
    parts.forEach(function (p, k) {
      for (var i = 0; i < p.x.length; i++) rows.push([p.x[i], k, p.y[i]]);
    });
    rows.sort(function (a, b) { return a[0] - b[0] || a[1] - b[1]; });
    var xs = new Array(rows.length), cols = parts.map(function () { return new Array(rows.length).fill(null); });
    for (var i = 0; i < rows.length; i++) { xs[i] = rows[i][0]; cols[rows[i][1]][i] = rows[i][2]; }
    return [xs].concat(cols);
  }

  function split(res) {  // one response -> recorded part and replayed part
    var rec = { x: [], y: [] }, rep = { x: [], y: [] };
    for (var i = 0; i < res.x.length; i++) {
      var t = res.source[i] === "replay" ? rep : rec;
      t.x.push(res.x[i]); t.y.push(res.y[i]);
    }
    return { rec: rec, rep: rep };
  }

  function Chart(el) {
    this.el = el;
    this.cfg = JSON.parse(el.getAttribute("data-cfg"));
    this.u = null;
    this.load(null, null);
  }

  Chart.prototype.points = function () {
    return Math.max(200, Math.min(4000, Math.round((this.el.clientWidth || 600) * 2)));
  };

  Chart.prototype.load = function (lo, hi) {
    var self = this, cfg = this.cfg, t0 = performance.now();
    var reqs = cfg.series.map(function (s) { return getJSON(seriesURL(s, cfg.x, self.points(), lo, hi)); });
    return Promise.all(reqs).then(function (res) {
      var parts = [], series = [{ label: cfg.x }], info = [];
      res.forEach(function (r, k) {
        var sp = split(r), c = COLORS[k % COLORS.length], lab = cfg.series[k].label;
        if (sp.rec.x.length || !sp.rep.x.length) {
          parts.push(sp.rec);
          series.push({ label: lab, stroke: c, width: 1.25, spanGaps: true, points: { show: false } });
        }
        if (sp.rep.x.length) {
          parts.push(sp.rep);
          series.push({ label: lab + " (replayed)", stroke: c, dash: [4, 3], width: 1.25, spanGaps: true,
                        points: { show: true, size: 4, fill: "#fff" } });
        }
        info.push(r.n_total + " pts" + (r.downsampled ? " → " + r.x.length : "") +
                  (r.n_nonfinite ? " · " + r.n_nonfinite + " non-finite (first at x=" + r.first_nonfinite_x + ")" : ""));
      });
      self.el.setAttribute("data-n-total", res.map(function (r) { return r.n_total; }).join(","));
      self.draw(merge(parts), series);
      self.setInfo(info.join(" | ") + (lo != null ? " · zoomed (double-click to reset)" : ""));
      self.el.setAttribute("data-ms", String(Math.round(performance.now() - t0)));
      self.el.setAttribute("data-t-ready", String(Math.round(performance.now())));
      self.el.setAttribute("data-ready", "1");
    }).catch(function (err) {
      self.setInfo("");
      var p = document.createElement("p");
      p.className = "error";
      p.textContent = String(err.message || err);
      self.el.appendChild(p);
      self.el.setAttribute("data-ready", "error");
    });
  };

  Chart.prototype.setInfo = function (text) {
    var n = this.el.querySelector(".chart-info");
    if (!n) { n = document.createElement("div"); n.className = "chart-info sub"; this.el.appendChild(n); }
    n.textContent = text;
  };

  Chart.prototype.draw = function (data, series) {
    var self = this, cfg = this.cfg;
    var opts = {
      width: Math.max(300, this.el.clientWidth || 600), height: 220,
      scales: { x: { time: cfg.x === "time" } },
      series: series,
      legend: { live: true },
      cursor: { drag: { x: true, y: false, setScale: false } },
      hooks: {
        setSelect: [function (u) {
          if (u.select.width < 3) return;
          var lo = u.posToVal(u.select.left, "x"), hi = u.posToVal(u.select.left + u.select.width, "x");
          u.setSelect({ left: 0, width: 0 }, false);
          self.load(lo, hi);
        }],
        draw: [function (u) {
          var marks = cfg.marks || [];
          if (!marks.length) return;
          var ctx = u.ctx, top = u.bbox.top, h = u.bbox.height;
          ctx.save();
          ctx.strokeStyle = "rgba(120,120,120,0.6)";
          ctx.setLineDash([2, 4]);
          ctx.lineWidth = 1;
          marks.forEach(function (m) {
            var px = Math.round(u.valToPos(m.x, "x", true));
            if (px < u.bbox.left || px > u.bbox.left + u.bbox.width) return;
            ctx.beginPath(); ctx.moveTo(px, top); ctx.lineTo(px, top + h); ctx.stroke();
          });
          ctx.restore();
        }]
      }
    };
    if (this.u) { this.u.destroy(); }
    var holder = this.el.querySelector(".plot");
    if (!holder) { holder = document.createElement("div"); holder.className = "plot"; this.el.insertBefore(holder, this.el.firstChild); }
    this.u = new uPlot(opts, data, holder);
    this.el._uplot = this.u;
    if (!this.bound) {
      this.bound = true;
      holder.addEventListener("dblclick", function () { self.load(null, null); });
    }
  };

  function partials() {
    document.querySelectorAll("[data-partial]").forEach(function (el) {
      var u = el.getAttribute("data-partial");
      el.removeAttribute("data-partial");
      fetch(u, { credentials: "same-origin" }).then(function (r) { return r.text(); }).then(function (t) {
        el.innerHTML = t;  // server-rendered, escaped HTML from our own origin
        el.setAttribute("data-loaded", "1");
      }).catch(function (err) { el.textContent = String(err); });
    });
  }

  function liveRuns() {
    var tb = document.getElementById("runs-body");
    if (!tb || !tb.getAttribute("data-live")) return;
    var u = tb.getAttribute("data-live");
    setInterval(function () {
      var checked = {};
      tb.querySelectorAll("input[type=checkbox]:checked").forEach(function (c) { checked[c.value] = 1; });
      fetch(u, { credentials: "same-origin" }).then(function (r) { return r.ok ? r.text() : null; }).then(function (t) {
        if (t == null) return;
        tb.innerHTML = t;
        tb.querySelectorAll("input[type=checkbox]").forEach(function (c) { if (checked[c.value]) c.checked = true; });
      }).catch(function () {});
    }, 3000);
  }

  function init() {
    document.querySelectorAll(".chart[data-cfg]").forEach(function (el) {
      try { window.flCharts.push(new Chart(el)); } catch (err) { el.textContent = String(err); }
    });
    partials();
    liveRuns();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();

/*
 * Draws the model-ready 12-lead ECG on a <canvas>: one 10 s strip per lead, in the model's lead
 * order (I, II, V1–V6, III, aVR, aVL, aVF), on ECG paper (major grid 0.2 s × 0.5 mV, minor grid
 * 0.04 s × 0.1 mV when it is wide enough to see). Amplitude uses the paper ratio
 * 10 mm/mV : 25 mm/s, so waves look as a clinician expects; a trace may cross into the
 * neighbouring strip as on paper.
 *
 * API: EcglabEcgPlot.draw(canvas, ecg) with ecg = {leads: [...], signals: [[mV...] per lead],
 * fs: samples per second of the sent points}. Sets canvas.dataset.leads / .points for tests.
 */
(function (global) {
  "use strict";

  var STRIP_HEIGHT = 46; // CSS pixels per lead
  var LABEL_WIDTH = 40;
  var PAPER = "#fff7f7";
  var MINOR = "#f8d9d9";
  var MAJOR = "#efb1b1";
  var TRACE = "#1b1f24";

  function gridLines(ctx, x0, y0, width, height, stepX, stepY, colour) {
    ctx.beginPath();
    for (var x = x0; x <= x0 + width + 0.5; x += stepX) {
      ctx.moveTo(Math.round(x) + 0.5, y0);
      ctx.lineTo(Math.round(x) + 0.5, y0 + height);
    }
    for (var y = y0; y <= y0 + height + 0.5; y += stepY) {
      ctx.moveTo(x0, Math.round(y) + 0.5);
      ctx.lineTo(x0 + width, Math.round(y) + 0.5);
    }
    ctx.strokeStyle = colour;
    ctx.lineWidth = 1;
    ctx.stroke();
  }

  function draw(canvas, ecg) {
    var leads = ecg.leads || [];
    var signals = ecg.signals || [];
    var cssWidth = Math.max(320, canvas.parentElement ? canvas.parentElement.clientWidth : 720);
    var cssHeight = STRIP_HEIGHT * leads.length + 18;
    var ratio = global.devicePixelRatio || 1;
    canvas.width = Math.round(cssWidth * ratio);
    canvas.height = Math.round(cssHeight * ratio);
    canvas.style.width = cssWidth + "px";
    canvas.style.height = cssHeight + "px";
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);

    var points = signals.length ? signals[0].length : 0;
    var seconds = points && ecg.fs ? points / ecg.fs : 10;
    var plotWidth = cssWidth - LABEL_WIDTH - 8;
    var pxPerSecond = plotWidth / seconds;
    var pxPerMv = pxPerSecond * 0.4; // 10 mm/mV at 25 mm/s
    var plotHeight = STRIP_HEIGHT * leads.length;

    ctx.fillStyle = PAPER;
    ctx.fillRect(LABEL_WIDTH, 0, plotWidth, plotHeight);
    if (pxPerSecond * 0.04 >= 4) gridLines(ctx, LABEL_WIDTH, 0, plotWidth, plotHeight, pxPerSecond * 0.04, pxPerMv * 0.1, MINOR);
    gridLines(ctx, LABEL_WIDTH, 0, plotWidth, plotHeight, pxPerSecond * 0.2, pxPerMv * 0.5, MAJOR);

    ctx.font = "600 12px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    for (var lead = 0; lead < leads.length; lead++) {
      var mid = STRIP_HEIGHT * lead + STRIP_HEIGHT / 2;
      ctx.fillStyle = "#333";
      ctx.fillText(leads[lead], 6, mid);
      var trace = signals[lead] || [];
      ctx.beginPath();
      for (var k = 0; k < trace.length; k++) {
        var x = LABEL_WIDTH + (k / ecg.fs) * pxPerSecond;
        var y = mid - trace[k] * pxPerMv;
        if (k === 0) ctx.moveTo(x, y);
        else ctx.lineTo(x, y);
      }
      ctx.strokeStyle = TRACE;
      ctx.lineWidth = 1.1;
      ctx.lineJoin = "round";
      ctx.stroke();
    }

    ctx.fillStyle = "#666";
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "top";
    for (var s = 0; s <= seconds; s += 1) {
      ctx.fillText(s + " s", LABEL_WIDTH + s * pxPerSecond - (s === seconds ? 22 : 0), plotHeight + 4);
    }
    canvas.dataset.leads = String(leads.length);
    canvas.dataset.points = String(points);
  }

  global.EcglabEcgPlot = { draw: draw };
})(window);

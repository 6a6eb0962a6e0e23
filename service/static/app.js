/* camserve web page: plain JavaScript, no libraries, talks only to this service's own endpoints. */
"use strict";

(() => {
  const EXAMPLE_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
  ];

  // What an HTTP status means to a person; the service's own `detail` text is shown under it.
  const STATUS_TITLES = {
    0: "Could not reach the service",
    400: "That file could not be read as an image",
    401: "This service needs an API key",
    408: "The upload arrived too slowly",
    413: "That is too large for the service",
    415: "That file type is not supported",
    422: "The service did not accept the request",
    429: "Too many requests; wait a moment and try again",
    500: "The service hit an internal error",
    503: "The service is busy or still starting; try again in a moment",
    504: "The service took too long to answer",
  };

  const $ = (id) => document.getElementById(id);

  /** Small DOM builder: el("p", {class: "x"}, "text", childNode). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "style") node.style.cssText = value; // CSSOM: the page's CSP refuses style attributes
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key in node && typeof value !== "string") node[key] = value;
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const pct = (p, digits = 1) => `${(100 * p).toFixed(digits)}%`;

  const state = {
    health: null,
    classes: EXAMPLE_CLASSES.slice(),
    defaultLayer: null, // from /health (gradcam.default_layer): the bundle's, never a guess here
    layers: [],
    colormap: null, // from /health (gradcam.colormap): the 256 RGB colours the server's PNGs use
    images: [], // {name, blob, url}
    predictions: null,
    gradcam: null,
    gradcamError: false,
    predictSeq: 0,
    gradcamSeq: 0,
    gradcamAbort: null,
    inFlight: 0,
    apiKey: sessionStorage.getItem("camserve-api-key") || "",
    misclassifiedTotal: null,
  };

  // ---------------------------------------------------------------- API access and errors

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
      this.detail = detail;
    }
  }

  function formatDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      // FastAPI's validation errors: [{loc: ["query", "top_k"], msg: "..."}]
      return detail
        .map((d) => {
          const where = (d.loc || []).filter((part) => part !== "query" && part !== "body").join(".");
          return where ? `${where}: ${d.msg}` : d.msg;
        })
        .join("; ");
    }
    return detail === undefined ? "" : JSON.stringify(detail);
  }

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (state.apiKey) headers.set("X-API-Key", state.apiKey);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(
        0,
        "The connection failed before an answer arrived. The service may be down, or it closed the " +
          "connection because the upload was too large.",
      );
    }
    if (response.ok) return response;
    let detail = "";
    try {
      detail = formatDetail((await response.json()).detail);
    } catch {
      detail = response.statusText || "no details given";
    }
    throw new ApiError(response.status, detail);
  }

  async function apiJson(path, options) {
    return (await api(path, options)).json();
  }

  function showError(err, context) {
    if (err && err.name === "AbortError") return;
    const status = err instanceof ApiError ? err.status : -1;
    const title = STATUS_TITLES[status] || (status > 0 ? `The service answered HTTP ${status}` : "Something went wrong");
    $("error-title").textContent = context ? `${context}: ${title.charAt(0).toLowerCase()}${title.slice(1)}` : title;
    const detail = err instanceof ApiError ? err.detail : String((err && err.message) || err);
    $("error-detail").textContent = status > 0 ? `${detail} (HTTP ${status})` : detail;
    $("api-key-form").hidden = status !== 401;
    $("error").hidden = false;
    if (status === 401) $("api-key").focus();
  }

  function hideError() {
    $("error").hidden = true;
  }

  function setBusy(delta) {
    state.inFlight = Math.max(0, state.inFlight + delta);
    $("results").setAttribute("aria-busy", state.inFlight > 0 ? "true" : "false");
  }

  // ---------------------------------------------------------------- health and the model card

  async function loadHealth(attempt = 0) {
    try {
      const health = await apiJson("health");
      state.health = health;
      applyHealth(health);
    } catch (err) {
      const retry = err instanceof ApiError && (err.status === 503 || err.status === 0) && attempt < 40;
      setStatus("error", retry ? "Model loading…" : "Service unavailable");
      if (retry) {
        setTimeout(() => loadHealth(attempt + 1), 1500);
      } else {
        showError(err, "Could not load the model card");
        $("model-name").textContent = "Not available";
      }
    }
  }

  function setStatus(kind, text) {
    $("service-status").dataset.state = kind;
    $("service-status-text").textContent = text;
  }

  function applyHealth(health) {
    const model = health.model;
    state.classes = model.classes;
    state.defaultLayer = health.gradcam.default_layer;
    state.layers = health.gradcam.layers;
    state.colormap = health.gradcam.colormap;
    setStatus("ready", `Ready · ${health.device} · ${health.precision}`);

    $("model-name").textContent = `${model.name} · ${model.architecture}`;
    // The headline is what this server answers with; the other figure says what TTA adds or costs.
    const flip = health.test_time_augmentation === "flip";
    const served = model.served_test_accuracy ?? model.test_accuracy;
    $("test-accuracy").textContent = served == null ? "n/a" : pct(served);
    if (flip && model.test_accuracy != null) {
      $("test-accuracy-extra").textContent = ` · with flip TTA (${pct(model.test_accuracy)} without)`;
    } else if (!flip && model.test_accuracy_flip_tta != null) {
      $("test-accuracy-extra").textContent = ` · ${pct(model.test_accuracy_flip_tta)} with flip TTA`;
    } else {
      $("test-accuracy-extra").textContent = "";
    }

    const facts = [
      ["Parameters", `${model.parameters.toLocaleString("en-US")} (${(model.parameters / 1e6).toFixed(2)} M)`],
      ["Device", health.device],
      ["Precision", el("span", { title: health.precision_reason }, health.precision)],
      ["Version", el("code", { title: model.version }, model.version.slice(0, 12))],
    ];
    if (model.val_accuracy != null) facts.push(["Validation", pct(model.val_accuracy)]);
    if (model.trained_epochs != null) {
      let training = `${model.trained_epochs} epochs`;
      if (model.training_seconds) training += ` in ${formatDuration(model.training_seconds)}`;
      if (model.hardware) training += ` on ${model.hardware}`;
      facts.push(["Training", training]);
    }
    $("model-facts").replaceChildren(...facts.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));

    const perClass = model.per_class_accuracy || {};
    const rows = state.classes
      .filter((name) => name in perClass)
      .map((name) => barRow(name, perClass[name], false, `${name}: ${pct(perClass[name])} of its test images correct`));
    $("per-class").replaceChildren(...(rows.length ? rows : [el("li", { class: "field-help" }, "Not recorded in this bundle.")]));
    renderCalibration(model.calibration, health.test_time_augmentation);

    $("layers-body").replaceChildren(
      ...state.layers.map((layer) =>
        el(
          "tr",
          {},
          el("td", {}, layer.name, layer.name === state.defaultLayer ? el("span", { class: "badge" }, "default") : null),
          el("td", {}, `${layer.output_size}×${layer.output_size}`),
          el("td", {}, `${layer.receptive_field} px`),
        ),
      ),
    );

    const layerSelect = $("layer");
    layerSelect.replaceChildren(
      ...state.layers.map((layer) =>
        el(
          "option",
          { value: layer.name, selected: layer.name === state.defaultLayer },
          `${layer.name} · ${layer.output_size}×${layer.output_size} map · RF ${layer.receptive_field} px` +
            (layer.name === state.defaultLayer ? " (default)" : ""),
        ),
      ),
    );
    layerSelect.value = state.defaultLayer;
    updateLayerHelp();
    renderOverlays(); // an answer that came before the colour map can be painted now
    applyMethods(health.gradcam);

    const targetSelect = $("target");
    targetSelect.replaceChildren(
      el("option", { value: "" }, "Predicted class"),
      ...state.classes.map((name) => el("option", { value: name }, name)),
    );
  }

  // ---------------------------------------------------------------- calibration (model card)

  const SVG_NS = "http://www.w3.org/2000/svg";

  function svgEl(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  /** Temperature, its test-set effect per TTA mode, and the served mode's reliability diagram. */
  function renderCalibration(calibration, servedMode) {
    const section = $("calibration");
    section.hidden = !calibration;
    if (!calibration) return;
    const T = calibration.temperature;
    const images = calibration.fitted_on_images;
    const fitted = images ? `, fitted on ${images.toLocaleString("en-US")} held-out training images` : "";
    const modes = Object.keys(calibration.test || {}).sort((a, b) => (b === servedMode) - (a === servedMode));
    const served = (calibration.test || {})[servedMode] || (calibration.test || {})[modes[0]];
    let summary = `Probabilities are temperature-scaled: logits ÷ ${T.toFixed(3)} before the softmax${fitted}.`;
    if (served) {
      summary +=
        ` On the test set, answers said to be ${pct(served.after.mean_confidence, 0)} sure on average were right` +
        ` ${pct(served.after.accuracy, 0)} of the time (before: ${pct(served.before.mean_confidence, 0)} said, ` +
        `${pct(served.before.accuracy, 0)} right).`;
    }
    $("calibration-summary").textContent = summary;

    const figure = section.querySelector(".reliability");
    figure.hidden = !served;
    section.querySelector(".table-wrap").hidden = !modes.length;
    if (served) {
      $("reliability-plot").replaceChildren(reliabilityDiagram(served.before, served.after, T));
      $("reliability-caption").replaceChildren(
        "Reliability on the test set, ",
        servedMode in calibration.test ? `${servedMode} TTA (served). ` : `${modes[0]} TTA. `,
        el("span", { class: "swatch swatch-before", "aria-hidden": "true" }),
        ` before (T = 1): ECE ${pct(served.before.ece)}; `,
        el("span", { class: "swatch swatch-after", "aria-hidden": "true" }),
        ` after (T = ${T.toFixed(2)}): ECE ${pct(served.after.ece)}. ` +
          `Dots: confidence bins (${served.after.reliability.length}, area by image count); ` +
          "on the dashed diagonal, confidence equals accuracy.",
      );
    }
    // One row per metric, one column per TTA mode (the served one first): fits the card's width.
    const fixed3 = (v) => v.toFixed(3);
    const metrics = [
      ["ECE", "ece", (v) => pct(v)],
      ["NLL", "nll", fixed3],
      ["Brier", "brier", fixed3],
    ];
    $("calibration-head").replaceChildren(
      el(
        "tr",
        {},
        el("th", { scope: "col" }, "Test set"),
        ...modes.map((mode) =>
          el("th", { scope: "col" }, `${mode} TTA`, mode === servedMode ? el("span", { class: "badge" }, "served") : null),
        ),
      ),
    );
    $("calibration-body").replaceChildren(
      ...metrics.map(([name, key, format]) =>
        el(
          "tr",
          {},
          el("th", { scope: "row" }, name),
          ...modes.map((mode) => {
            const { before, after } = calibration.test[mode];
            return el("td", { title: "before (T = 1) → after" }, `${format(before[key])} → ${format(after[key])}`);
          }),
        ),
      ),
    );
  }

  const METHOD_LABELS = {
    gradcam: "Grad-CAM",
    hirescam: "HiResCAM",
    gradcampp: "Grad-CAM++",
    xgradcam: "XGrad-CAM",
    layercam: "LayerCAM",
    random: "random",
  };
  const methodLabel = (name) => METHOD_LABELS[name] || name;

  // The method selector, and the model card's table of mean ROAD per method and layer (if measured).
  function applyMethods(gradcam) {
    const methods = gradcam.methods || ["gradcam"];
    const methodSelect = $("method");
    const current = methodSelect.value || gradcam.default_method;
    methodSelect.replaceChildren(...methods.map((name) => el("option", { value: name }, methodLabel(name))));
    methodSelect.value = methods.includes(current) ? current : gradcam.default_method;

    const table = gradcam.faithfulness;
    $("faithfulness-section").hidden = !table;
    if (!table) return;
    $("faithfulness-help").textContent =
      `Mean ROAD of each method's heatmap on ${table.images.toLocaleString("en-US")} test images ` +
      `(higher is more faithful; a random heatmap scores about 0). Most faithful: ` +
      `${methodLabel(table.best.method)} at ${table.best.layer}.`;
    $("faithfulness-head").replaceChildren(
      el("tr", {}, el("th", { scope: "col" }, "Method"), ...table.layers.map((layer) => el("th", { scope: "col" }, layer))),
    );
    $("faithfulness-body").replaceChildren(
      ...Object.entries(table.road).map(([method, byLayer]) =>
        el(
          "tr",
          {},
          el("th", { scope: "row" }, methodLabel(method)),
          ...table.layers.map((layer) => {
            const best = method === table.best.method && layer === table.best.layer;
            const error = table.standard_error?.[method]?.[layer];
            return el(
              "td",
              { class: best ? "best" : null, title: error == null ? null : `± ${error.toFixed(3)} (standard error)` },
              byLayer[layer] == null ? "–" : byLayer[layer].toFixed(3),
            );
          }),
        ),
      ),
    );
  }

  /** Confidence (x) against accuracy (y) per bin, before and after the temperature, over the diagonal. */
  function reliabilityDiagram(before, after, temperature) {
    const size = 260;
    const pad = { left: 36, right: 10, top: 10, bottom: 34 };
    const w = size - pad.left - pad.right;
    const h = size - pad.top - pad.bottom;
    const x = (v) => (pad.left + v * w).toFixed(1);
    const y = (v) => (pad.top + (1 - v) * h).toFixed(1);
    const counts = [...before.reliability, ...after.reliability].map((b) => b.count);
    const maxCount = Math.max(1, ...counts);
    const ticks = [0, 0.25, 0.5, 0.75, 1];

    const axes = svgEl(
      "g",
      { class: "rel-axes" },
      ...ticks.flatMap((t) => [
        svgEl("line", { class: "rel-grid", x1: x(t), x2: x(t), y1: y(0), y2: y(1) }),
        svgEl("line", { class: "rel-grid", x1: x(0), x2: x(1), y1: y(t), y2: y(t) }),
        svgEl("text", { class: "rel-tick", x: x(t), y: Number(y(0)) + 12, "text-anchor": "middle" }, `${t * 100}`),
        svgEl("text", { class: "rel-tick", x: pad.left - 4, y: Number(y(t)) + 3, "text-anchor": "end" }, `${t * 100}`),
      ]),
      svgEl("text", { class: "rel-axis-title", x: x(0.5), y: size - 4, "text-anchor": "middle" }, "confidence (%)"),
      svgEl(
        "text",
        { class: "rel-axis-title", x: 10, y: y(0.5), "text-anchor": "middle", transform: `rotate(-90 10 ${y(0.5)})` },
        "accuracy (%)",
      ),
      svgEl("line", { class: "rel-diagonal", x1: x(0), y1: y(0), x2: x(1), y2: y(1) }),
    );

    const series = (report, name, label) => {
      const bins = report.reliability.filter((b) => b.count > 0);
      return svgEl(
        "g",
        { class: `rel-series rel-${name}` },
        svgEl("polyline", { points: bins.map((b) => `${x(b.confidence)},${y(b.accuracy)}`).join(" ") }),
        ...bins.map((b) =>
          svgEl(
            "circle",
            { cx: x(b.confidence), cy: y(b.accuracy), r: (1.5 + 4.5 * Math.sqrt(b.count / maxCount)).toFixed(2) },
            svgEl(
              "title",
              {},
              `${label}: ${b.count} images with confidence ${pct(b.lower, 0)}–${pct(b.upper, 0)}, ` +
                `on average ${pct(b.confidence)} sure, ${pct(b.accuracy)} right`,
            ),
          ),
        ),
      );
    };

    return svgEl(
      "svg",
      {
        viewBox: `0 0 ${size} ${size}`,
        role: "img",
        "aria-label":
          `Reliability diagram: test-set accuracy against confidence per bin. Before calibration the ` +
          `confidence averages ${pct(before.mean_confidence)} at ${pct(before.accuracy)} accuracy (ECE ` +
          `${pct(before.ece)}); after T = ${temperature.toFixed(2)} it averages ${pct(after.mean_confidence)} ` +
          `(ECE ${pct(after.ece)}).`,
      },
      axes,
      series(before, "before", "before"),
      series(after, "after", "after"),
    );
  }

  function formatDuration(seconds) {
    if (seconds < 90) return `${Math.round(seconds)} s`;
    if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
    return `${(seconds / 3600).toFixed(1)} h`;
  }

  function updateLayerHelp() {
    const layer = state.layers.find((row) => row.name === $("layer").value);
    if (!layer) return;
    const input = 32;
    const window =
      layer.receptive_field >= input
        ? `a ${layer.receptive_field}×${layer.receptive_field}-pixel window, more than the whole image`
        : `a ${layer.receptive_field}×${layer.receptive_field}-pixel window`;
    $("layer-help").textContent = `Each cell of the ${layer.output_size}×${layer.output_size} map sees ${window}.`;
  }

  function barRow(label, probability, top, title) {
    const width = Math.max(0, Math.min(1, probability)) * 100;
    return el(
      "li",
      { class: top ? "bar-row top" : "bar-row", title },
      el("span", { class: "bar-label" }, label),
      el(
        "span",
        { class: "bar-track", "aria-hidden": "true" },
        el("span", { class: "bar-fill", style: `width:${width.toFixed(2)}%` }),
      ),
      el("span", { class: "bar-pct" }, pct(probability)),
    );
  }

  // ---------------------------------------------------------------- choosing images

  function setImages(list) {
    for (const image of state.images) URL.revokeObjectURL(image.url);
    state.images = list.map((item) => ({ ...item, url: URL.createObjectURL(item.blob) }));
    state.predictions = null;
    state.gradcam = null;
    state.gradcamError = false;
    hideError();
    renderResults();
    if (!state.images.length) return;
    runPredict();
    if (gradcamOn()) runGradcam();
  }

  function filesChosen(fileList) {
    const files = Array.from(fileList || []);
    if (files.length) setImages(files.map((file) => ({ name: file.name || "image", blob: file })));
  }

  async function loadExamples(classes) {
    try {
      const blobs = await Promise.all(
        classes.map(async (name) => ({ name: `${name}.png`, blob: await (await api(`static/examples/${name}.png`)).blob() })),
      );
      setImages(blobs);
    } catch (err) {
      showError(err, "Could not load the example image");
    }
  }

  function buildExamples() {
    $("example-grid").replaceChildren(
      ...EXAMPLE_CLASSES.map((name) =>
        el(
          "button",
          {
            type: "button",
            class: "example",
            title: `Classify a CIFAR-10 test image of a ${name}`,
            "data-example": name,
            onclick: () => loadExamples([name]),
          },
          el("img", { class: "pixelated", src: `static/examples/${name}.png`, alt: "", width: "32", height: "32" }),
          el("span", {}, name),
        ),
      ),
    );
  }

  // ---------------------------------------------------------------- predictions and Grad-CAM

  function formData() {
    const form = new FormData();
    for (const image of state.images) form.append("files", image.blob, image.name);
    return form;
  }

  const gradcamOn = () => $("gradcam-on").checked;

  async function runPredict() {
    if (!state.images.length) return;
    const seq = ++state.predictSeq;
    setBusy(+1);
    try {
      const body = await apiJson(`predict?top_k=${encodeURIComponent($("top-k").value)}`, {
        method: "POST",
        body: formData(),
      });
      if (seq !== state.predictSeq) return;
      state.predictions = body.predictions;
      renderResults();
    } catch (err) {
      if (seq !== state.predictSeq) return;
      state.predictions = "failed";
      showError(err, "Could not classify");
      renderResults();
    } finally {
      setBusy(-1);
    }
  }

  // The overlay is composited here from the heatmap, so the slider needs no request. Opacity 0 makes the
  // answer's overlay_png the 32×32 image exactly as the model saw it (decoded, turned upright, resized
  // the server's way): the picture the heatmap is blended over.
  function gradcamQuery() {
    const params = new URLSearchParams({ opacity: "0", format: "json" });
    if ($("layer").value) params.set("layer", $("layer").value);
    if ($("method").value) params.set("method", $("method").value);
    if ($("target").value) params.set("target", $("target").value);
    if ($("road-on").checked) params.set("faithfulness", "road");
    return params.toString();
  }

  async function runGradcam() {
    if (!state.images.length || !gradcamOn()) return;
    const seq = ++state.gradcamSeq;
    if (state.gradcamAbort) state.gradcamAbort.abort();
    const abort = new AbortController();
    state.gradcamAbort = abort;
    setBusy(+1);
    try {
      const body = await apiJson(`gradcam?${gradcamQuery()}`, {
        method: "POST",
        body: formData(),
        signal: abort.signal,
      });
      await Promise.all(body.results.map(withPixels));
      if (seq !== state.gradcamSeq) return;
      state.gradcam = body.results;
      state.gradcamError = false;
      renderOverlays();
    } catch (err) {
      if (seq !== state.gradcamSeq || err.name === "AbortError") return;
      state.gradcam = null;
      state.gradcamError = true;
      // The same request failing for /predict already explains itself; don't stack a second message.
      if (state.predictions !== "failed") showError(err, "Could not compute Grad-CAM");
      renderOverlays();
    } finally {
      setBusy(-1);
    }
  }

  // ---------------------------------------------------------------- the overlay, composited here

  /** numpy's rint: halves go to the even neighbour, as service/render.py rounds. */
  function rint(x) {
    const r = Math.round(x);
    return x - Math.floor(x) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  /** Adds `pixels` (RGBA bytes) to a /gradcam row: its overlay_png, asked for at opacity 0, decoded. */
  async function withPixels(row) {
    const image = new Image();
    image.src = `data:image/png;base64,${row.overlay_png}`;
    await image.decode();
    const canvas = document.createElement("canvas");
    canvas.width = image.naturalWidth;
    canvas.height = image.naturalHeight;
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(image, 0, 0);
    row.pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    return row;
  }

  const overlayRows = new WeakMap(); // canvas -> the /gradcam row it shows

  /** Paints service/render.py's overlay: (1 - a) * image + a * colormap[rint(255 * heat)], rounded. */
  function paintOverlay(canvas, row, opacity) {
    const heatmap = row.heatmap;
    const height = heatmap.length;
    const width = heatmap[0].length;
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const out = context.createImageData(width, height);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = 4 * (y * width + x);
        const colour = state.colormap[Math.min(255, Math.max(0, rint(heatmap[y][x] * 255)))];
        for (let c = 0; c < 3; c++) {
          out.data[i + c] = rint((1 - opacity) * row.pixels[i + c] + opacity * colour[c]);
        }
        out.data[i + 3] = 255;
      }
    }
    context.putImageData(out, 0, 0);
    canvas.dataset.opacity = String(opacity);
    overlayRows.set(canvas, row);
  }

  function overlayCanvas(row, attrs) {
    const canvas = el("canvas", { class: "pixelated overlay", role: "img", ...attrs });
    paintOverlay(canvas, row, Number($("opacity").value));
    return canvas;
  }

  /** The opacity slider: every overlay on the page is painted again, here, with no request. */
  function repaintOverlays() {
    const opacity = Number($("opacity").value);
    for (const canvas of document.querySelectorAll("canvas.overlay")) {
      const row = overlayRows.get(canvas);
      if (row) paintOverlay(canvas, row, opacity);
    }
  }

  // ---------------------------------------------------------------- rendering results

  function renderResults() {
    const results = $("results");
    if (!state.images.length) {
      results.replaceChildren(
        el("div", { id: "results-empty", class: "empty" },
          el("p", {}, "No image yet. Choose a file, drop one above, or pick one of the examples.")),
      );
      return;
    }
    if (state.predictions === "failed") {
      results.replaceChildren(
        el("div", { class: "empty" }, el("p", {}, "No results: the service refused the request (see the message above). Choose other images to try again.")),
      );
      return;
    }
    results.replaceChildren(...state.images.map((image, i) => resultCard(image, i)));
  }

  function resultCard(image, index) {
    const prediction = Array.isArray(state.predictions) ? state.predictions[index] : null;
    const figures = el(
      "div",
      { class: "result-figures" },
      el(
        "figure",
        {},
        el("img", { class: "pixelated", src: image.url, alt: `Input image ${image.name}` }),
        el("figcaption", {}, "Input"),
      ),
      el("div", { class: "overlay-slot", "data-overlay-index": String(index) }, overlayFigure(index)),
    );
    let body;
    if (prediction) {
      const [top] = prediction.top_k;
      body = el(
        "div",
        { class: "result-body" },
        el(
          "div",
          { class: "result-title" },
          el("p", { class: "verdict" }, top.label, el("small", {}, pct(top.probability))),
          el("h3", {}, image.name),
        ),
        el(
          "ol",
          { class: "bars", "aria-label": `Top ${prediction.top_k.length} classes for ${image.name}` },
          prediction.top_k.map((row, i) => barRow(row.label, row.probability, i === 0)),
        ),
        el("p", { class: "gradcam-note", "data-gradcam-note": String(index) }, gradcamNote(index)),
      );
    } else {
      body = el(
        "div",
        { class: "result-body" },
        el("div", { class: "result-title" }, el("h3", {}, image.name)),
        el("p", { class: "field-help" }, el("span", { class: "spinner", "aria-hidden": "true" }), " Classifying…"),
      );
    }
    return el("article", { class: "result-card", "aria-label": `Result for ${image.name}` }, figures, body);
  }

  function gradcamNote(index) {
    const row = gradcamOn() && Array.isArray(state.gradcam) ? state.gradcam[index] : null;
    if (!row) return "";
    const explains = row.target === row.label ? "the predicted class" : `“${row.target}” (${pct(row.target_probability)})`;
    return `${methodLabel(row.method)} at ${row.layer} explains ${explains}. Bright yellow marks the strongest evidence.`;
  }

  function overlayFigure(index) {
    if (!gradcamOn()) return null;
    const row = Array.isArray(state.gradcam) ? state.gradcam[index] : null;
    if (row && state.colormap) {
      return el(
        "figure",
        {},
        overlayCanvas(row, {
          "aria-label": `${methodLabel(row.method)} overlay for ${state.images[index].name}: where ${row.layer} found evidence for “${row.target}”`,
        }),
        el(
          "figcaption",
          { class: "legend" },
          `${methodLabel(row.method)} · ${row.layer} · “${row.target}”`,
          el("span", { class: "legend-bar", "aria-hidden": "true" }),
          el("span", { class: "legend-ends", "aria-hidden": "true" }, el("span", {}, "low"), el("span", {}, "high")),
        ),
        row.road == null
          ? null
          : el(
              "p",
              { class: "road-score", title: "ROAD: higher means the probability depends more on the pixels ranked high" },
              `ROAD faithfulness ${row.road.toFixed(3)}`,
            ),
      );
    }
    return el(
      "div",
      { class: "overlay-pending" },
      state.gradcamError ? "Grad-CAM unavailable" : el("span", {}, el("span", { class: "spinner", "aria-hidden": "true" }), " Grad-CAM…"),
    );
  }

  function renderOverlays() {
    for (const slot of document.querySelectorAll("[data-overlay-index]")) {
      const figure = overlayFigure(Number(slot.dataset.overlayIndex));
      slot.replaceChildren(...(figure ? [figure] : []));
    }
    for (const note of document.querySelectorAll("[data-gradcam-note]")) {
      note.textContent = gradcamNote(Number(note.dataset.gradcamNote));
    }
  }

  function syncGradcamControls() {
    const on = gradcamOn();
    $("gradcam-settings").disabled = !on;
    for (const id of ["layer", "method", "target", "opacity", "road-on"]) $(id).disabled = !on;
  }

  // ---------------------------------------------------------------- misclassified gallery

  function base64ToBlob(b64, type) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type });
  }

  async function loadMisclassifiedTotal() {
    try {
      const body = await apiJson("misclassified?n=1");
      setMisclassifiedTotal(body.total);
    } catch (err) {
      if (err instanceof ApiError && err.status === 422) setMisclassifiedTotal(0);
      // Anything else is reported when the person asks for the gallery.
    }
  }

  function setMisclassifiedTotal(total) {
    state.misclassifiedTotal = total;
    const input = $("gallery-n");
    input.max = String(Math.max(1, total));
    if (Number(input.value) > total && total > 0) input.value = String(total);
    $("gallery-total").textContent = total
      ? `of ${total.toLocaleString("en-US")} misclassified test images stored with the model`
      : "No misclassified images are stored with this model.";
  }

  async function showGallery(event) {
    event.preventDefault();
    const n = Number($("gallery-n").value);
    const gallery = $("gallery");
    const button = event.submitter || $("gallery-form").querySelector("button");
    button.disabled = true;
    gallery.setAttribute("aria-busy", "true");
    try {
      const body = await apiJson(`misclassified?n=${encodeURIComponent(n)}`);
      setMisclassifiedTotal(body.total);
      gallery.replaceChildren(...body.items.map(mistakeCard));
      hideError();
    } catch (err) {
      showError(err, "Could not load the misclassified images");
    } finally {
      button.disabled = false;
      gallery.setAttribute("aria-busy", "false");
    }
  }

  function mistakeCard(item) {
    const images = el(
      "div",
      { class: "mistake-images" },
      el(
        "figure",
        {},
        el("img", {
          class: "pixelated",
          src: `data:image/png;base64,${item.image_png}`,
          alt: `Test image ${item.test_index}: a ${item.true_label} predicted as ${item.predicted_label}`,
        }),
        el("figcaption", {}, `test #${item.test_index}`),
      ),
    );
    const overlays = el("div", { class: "mistake-overlays", hidden: true, style: "display:contents" });
    images.append(overlays);
    const button = el("button", { type: "button", class: "btn btn-ghost btn-small", "aria-expanded": "false" }, "Show Grad-CAM");
    let loaded = false;
    button.addEventListener("click", async () => {
      const expanded = button.getAttribute("aria-expanded") === "true";
      if (loaded) {
        overlays.hidden = expanded;
        overlays.style.display = expanded ? "none" : "contents";
        button.setAttribute("aria-expanded", String(!expanded));
        button.textContent = expanded ? "Show Grad-CAM" : "Hide Grad-CAM";
        return;
      }
      button.disabled = true;
      button.replaceChildren(el("span", { class: "spinner", "aria-hidden": "true" }), " Computing…");
      try {
        const blob = base64ToBlob(item.image_png, "image/png");
        const explain = async (target) => {
          const params = new URLSearchParams({ opacity: "0", target }); // opacity 0: see gradcamQuery
          const layer = $("layer").value || state.defaultLayer;
          if (layer) params.set("layer", layer);
          params.set("method", $("method").value || "gradcam");
          const form = new FormData();
          form.append("files", blob, `test-${item.test_index}.png`);
          return withPixels((await apiJson(`gradcam?${params}`, { method: "POST", body: form })).results[0]);
        };
        const [why, truth] = await Promise.all([explain(item.predicted_label), explain(item.true_label)]);
        overlays.replaceChildren(
          overlayThumb(why, `Why “${item.predicted_label}”`),
          overlayThumb(truth, `Evidence for “${item.true_label}”`),
        );
        overlays.hidden = false;
        overlays.style.display = "contents";
        loaded = true;
        button.setAttribute("aria-expanded", "true");
        button.textContent = "Hide Grad-CAM";
      } catch (err) {
        showError(err, "Could not compute Grad-CAM");
        button.textContent = "Show Grad-CAM";
      } finally {
        button.disabled = false;
      }
    });
    return el(
      "article",
      { class: "mistake", "aria-label": `Misclassified test image ${item.test_index}` },
      images,
      el(
        "dl",
        { class: "mistake-labels" },
        el("dt", {}, "True"),
        el("dd", { class: "mistake-true" }, item.true_label),
        el("dt", {}, "Predicted"),
        el("dd", { class: "mistake-pred" }, item.predicted_label, el("span", { class: "conf" }, pct(item.confidence))),
      ),
      button,
    );
  }

  function overlayThumb(row, caption) {
    return el(
      "figure",
      { class: "mistake-overlay" },
      overlayCanvas(row, { "aria-label": `Grad-CAM overlay at ${row.layer}: ${caption}` }),
      el("figcaption", {}, caption),
    );
  }

  // ---------------------------------------------------------------- wiring

  function wire() {
    buildExamples();
    $("file-input").addEventListener("change", (event) => {
      filesChosen(event.target.files);
      event.target.value = ""; // choosing the same file again still triggers a change
    });

    const dropzone = $("dropzone");
    let depth = 0;
    dropzone.addEventListener("dragenter", (event) => {
      event.preventDefault();
      depth += 1;
      dropzone.classList.add("dragover");
    });
    dropzone.addEventListener("dragover", (event) => {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    });
    dropzone.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) dropzone.classList.remove("dragover");
    });
    dropzone.addEventListener("drop", (event) => {
      event.preventDefault();
      depth = 0;
      dropzone.classList.remove("dragover");
      filesChosen(event.dataTransfer.files);
    });
    // A file dropped anywhere else must not navigate away from the page.
    window.addEventListener("dragover", (event) => event.preventDefault());
    window.addEventListener("drop", (event) => event.preventDefault());
    // Pasting an image classifies it.
    document.addEventListener("paste", (event) => {
      const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
      if (files.length) filesChosen(files);
    });

    $("all-examples").addEventListener("click", () => loadExamples(EXAMPLE_CLASSES));
    $("controls").addEventListener("submit", (event) => event.preventDefault());
    $("top-k").addEventListener("change", runPredict);
    $("gradcam-on").addEventListener("change", () => {
      syncGradcamControls();
      if (gradcamOn()) {
        state.gradcam = null;
        state.gradcamError = false;
        runGradcam();
      }
      renderOverlays();
    });
    $("layer").addEventListener("change", () => {
      updateLayerHelp();
      runGradcam();
    });
    $("target").addEventListener("change", runGradcam);
    $("method").addEventListener("change", runGradcam);
    $("road-on").addEventListener("change", runGradcam);
    $("opacity").addEventListener("input", () => {
      $("opacity-value").textContent = `${Math.round(Number($("opacity").value) * 100)}%`;
      repaintOverlays();
    });

    $("gallery-form").addEventListener("submit", showGallery);
    $("error-close").addEventListener("click", hideError);
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !$("error").hidden) hideError();
    });
    $("api-key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.apiKey = $("api-key").value.trim();
      sessionStorage.setItem("camserve-api-key", state.apiKey);
      hideError();
      if (state.images.length) setImages(state.images.map(({ name, blob }) => ({ name, blob })));
      loadMisclassifiedTotal();
    });

    window.addEventListener("error", (event) => showError(event.error || event.message));
    window.addEventListener("unhandledrejection", (event) => showError(event.reason));

    // Sticky things (the error message, the model card) sit just below the sticky header.
    const header = document.querySelector(".topbar");
    const measureHeader = () =>
      document.documentElement.style.setProperty("--header-h", `${header.offsetHeight}px`);
    measureHeader();
    window.addEventListener("resize", measureHeader);

    syncGradcamControls();
    loadHealth();
    loadMisclassifiedTotal();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", wire);
  else wire();
})();

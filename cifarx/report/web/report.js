// The live demo of a cifarx report: every exported .onnx file runs in this browser with onnxruntime-web
// (WebAssembly backend), with the class names read from the model's own metadata.
// For machines: each sample result is an element with data-model, data-image, data-predicted (and data-ms);
// document.body.dataset.ready becomes "true" when every sample is classified, or "error" with a visible message.
// Everything shown comes from files (names, metadata): it goes into the page as textContent and dataset values,
// never as markup.
"use strict";

const TOP_K = 5;
const SIZE = 32;  // cifarx exports take [N,3,32,32]; the report refuses any other file before it gets here

// onnxruntime-web exposes inputs and outputs but not the model's metadata_props, so read them from the bytes:
// ModelProto field 14 is `repeated StringStringEntryProto metadata_props` (key = 1, value = 2).
function onnxMetadata(bytes) {
  const text = new TextDecoder();
  function varint(state) {
    let value = 0, scale = 1, byte;
    do {
      byte = bytes[state.pos++];
      value += (byte & 0x7f) * scale;
      scale *= 128;
    } while (byte & 0x80);
    return value;
  }
  function fields(start, end, visit) {
    const state = { pos: start };
    while (state.pos < end) {
      const key = varint(state), field = Math.floor(key / 8), wire = key & 7;
      if (wire === 0) varint(state);
      else if (wire === 1) state.pos += 8;
      else if (wire === 5) state.pos += 4;
      else if (wire === 2) {
        const length = varint(state);
        visit(field, state.pos, state.pos + length);
        state.pos += length;
      } else throw new Error(`not an ONNX file (protobuf wire type ${wire})`);
    }
  }
  const metadata = Object.create(null);  // keys come from the file: no inherited names such as __proto__
  fields(0, bytes.length, (field, start, end) => {
    if (field !== 14) return;
    const entry = {};
    fields(start, end, (inner, s, e) => { entry[inner] = text.decode(bytes.subarray(s, e)); });
    metadata[entry[1]] = entry[2];
  });
  return metadata;
}

// RGBA pixels of a size x size image -> float32 [1,3,size,size] RGB in [0,1], as the exported graph expects.
function toTensor(imageData, size) {
  const plane = size * size, floats = new Float32Array(3 * plane), rgba = imageData.data;
  for (let i = 0; i < plane; i++) {
    floats[i] = rgba[4 * i] / 255;
    floats[plane + i] = rgba[4 * i + 1] / 255;
    floats[2 * plane + i] = rgba[4 * i + 2] / 255;
  }
  return new ort.Tensor("float32", floats, [1, 3, size, size]);
}

function pixelsOf(bitmap, size) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = size;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(bitmap, 0, 0, size, size);
  return { canvas, imageData: context.getImageData(0, 0, size, size) };
}

async function loadModel(entry) {
  const response = await fetch(entry.url);
  if (!response.ok) throw new Error(`cannot fetch ${entry.url}: HTTP ${response.status}`);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const classNames = JSON.parse(onnxMetadata(bytes).class_names ?? "null");
  if (!Array.isArray(classNames) || !classNames.every((name) => typeof name === "string")) {
    throw new Error("no list of class_names in the model's metadata");
  }
  const session = await ort.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
  return { name: entry.name, session, classNames, size: SIZE };
}

async function classify(model, tensor) {
  const start = performance.now();
  const outputs = await model.session.run({ [model.session.inputNames[0]]: tensor });
  const ms = performance.now() - start;
  const logits = Array.from(outputs[model.session.outputNames[0]].data);  // logits come first in cifarx exports
  if (!logits.every(Number.isFinite)) throw new Error(`${model.name} gave non-finite outputs`);
  const peak = Math.max(...logits), exps = logits.map((v) => Math.exp(v - peak));
  const total = exps.reduce((a, b) => a + b, 0);
  const ranked = exps.map((v, i) => [model.classNames[i], v / total]).sort((a, b) => b[1] - a[1]);
  return { top: ranked.slice(0, TOP_K), ms };
}

function resultElement(tag, model, image, result) {
  const element = document.createElement(tag);
  element.dataset.model = model.name;
  element.dataset.image = image;
  element.dataset.predicted = result.top[0][0];
  element.dataset.probability = String(result.top[0][1]);
  element.dataset.ms = result.ms.toFixed(3);
  return element;
}

function figure(canvasOrImage, caption) {
  const element = document.createElement("figure");
  const label = document.createElement("figcaption");
  label.textContent = caption;
  element.append(canvasOrImage, label);
  return element;
}

async function classifySamples(models, samples) {
  const grid = document.getElementById("samples");
  const bitmaps = [];
  for (const sample of samples) {
    const blob = await (await fetch(sample.url)).blob();
    // The PNGs hold the exact pixels ONNX Runtime Python is fed: no colour conversion, no resampling.
    bitmaps.push(await createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" }));
  }
  for (const model of models) {
    if (bitmaps.length) await classify(model, toTensor(pixelsOf(bitmaps[0], model.size).imageData, model.size));  // warm-up, untimed
  }
  const lists = samples.map((sample, index) => {
    const list = document.createElement("ul");
    const { canvas } = pixelsOf(bitmaps[index], bitmaps[index].width);
    const card = figure(canvas, sample.image);
    card.append(list);
    grid.append(card);
    return list;
  });
  for (const model of models) {
    for (const [index, sample] of samples.entries()) {
      const result = await classify(model, toTensor(pixelsOf(bitmaps[index], model.size).imageData, model.size));
      const item = resultElement("li", model, sample.image, result);
      item.textContent = `${model.name}: ${result.top[0][0]} ${(100 * result.top[0][1]).toFixed(1)}% (${result.ms.toFixed(1)} ms)`;
      lists[index].append(item);
    }
  }
}

async function classifyPicked(models, file) {
  const picked = document.getElementById("picked");
  picked.replaceChildren();
  // A photo of any size is resized by the browser here; Python's `cifarx predict` resizes with Pillow's bilinear
  // filter, so on large photos the two may differ slightly (the samples above avoid this: they are stored at 32x32).
  const bitmap = await createImageBitmap(file);
  for (const model of models) {
    const { canvas, imageData } = pixelsOf(bitmap, model.size);
    const result = await classify(model, toTensor(imageData, model.size));
    const list = document.createElement("ol");
    for (const [name, probability] of result.top) {
      const line = document.createElement("li");
      line.textContent = `${name} ${(100 * probability).toFixed(1)}%`;
      list.append(line);
    }
    const card = figure(canvas, `${model.name} (${result.ms.toFixed(1)} ms)`);
    card.append(list);
    card.append(resultElement("span", model, file.name, result));
    picked.append(card);
  }
}

function sortTable(table, column, header) {
  const descending = header.getAttribute("aria-sort") === "ascending";
  const key = (row) => {
    const cell = row.children[column];
    const raw = cell ? (cell.dataset.sort ?? cell.textContent) : "";
    const number = Number(raw);
    return raw !== "" && Number.isFinite(number) ? number : raw;
  };
  const rows = Array.from(table.tBodies[0].rows);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    return descending ? -order : order;
  });
  table.querySelectorAll("th").forEach((th) => th.removeAttribute("aria-sort"));
  header.setAttribute("aria-sort", descending ? "descending" : "ascending");
  table.tBodies[0].append(...rows);
}

function setUpSorting() {
  for (const table of document.querySelectorAll("table.sortable")) {
    table.querySelectorAll("th").forEach((header) => {
      const sort = () => sortTable(table, Number(header.dataset.column), header);
      header.addEventListener("click", sort);
      header.addEventListener("keydown", (event) => { if (event.key === "Enter") sort(); });
    });
  }
}

async function main() {
  setUpSorting();
  const status = document.getElementById("status");
  const data = JSON.parse(document.getElementById("report-data").textContent);
  try {
    if (location.protocol === "file:") {
      throw new Error("the live demo needs the site served over http (browsers refuse to fetch files from file:// pages): "
                      + "python -m http.server -d SITE, then open http://127.0.0.1:8000/");
    }
    if (typeof ort === "undefined") throw new Error("ort/ort.wasm.min.js did not load");
    ort.env.wasm.wasmPaths = new URL("ort/", location.href).href;
    // Threads need a cross-origin-isolated page, which a plain static server does not give: one thread, said plainly.
    ort.env.wasm.numThreads = 1;
    const models = [];
    for (const entry of data.models) {
      status.textContent = `loading ${entry.name}…`;
      try {
        models.push(await loadModel(entry));
      } catch (error) {  // one file the browser cannot run must not take the demo down for the others
        const note = document.createElement("li");
        note.dataset.model = entry.name;
        note.textContent = `${entry.name}: not runnable in the browser (${error.message || error})`;
        document.getElementById("demo-notes").append(note);
      }
    }
    status.textContent = `classifying ${data.samples.length} sample images with ${models.length} models…`;
    await classifySamples(models, data.samples);
    status.textContent = `${models.length} models loaded (onnxruntime-web ${ort.env.versions?.web ?? ""}, WebAssembly, 1 thread)`
      + (data.samples.length ? `; ${data.samples.length} samples classified` : "");
    const pick = async (file) => {
      try { await classifyPicked(models, file); }
      catch (error) { status.textContent = `could not classify ${file.name}: ${error.message}`; status.className = "error"; }
    };
    document.getElementById("pick").addEventListener("change", (event) => { if (event.target.files[0]) pick(event.target.files[0]); });
    const drop = document.getElementById("drop");
    drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      if (event.dataTransfer.files[0]) pick(event.dataTransfer.files[0]);
    });
    document.body.dataset.ready = "true";
  } catch (error) {
    status.textContent = `error: ${error.message || error}`;
    status.className = "error";
    document.body.dataset.ready = "error";
  }
}

main();

// The page's logic: read an image file, call fashion_mnist.v1.Classifier/Classify through gRPC-Web on this
// origin, and show the answer. The gRPC-Web framing and the few protobuf messages it needs are written out here
// by hand (field numbers from proto/fashion_mnist/v1/classifier.proto), so the page has no dependencies and
// works without any network beyond this server.
'use strict';

const CLASSIFY = '/fashion_mnist.v1.Classifier/Classify';
const GET_MODEL_INFO = '/fashion_mnist.v1.Classifier/GetModelInfo';

// ---- protobuf wire format: just what these messages use ----------------------------------------------------

const VARINT = 0, I64 = 1, LEN = 2, I32 = 5;
const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder();

function varint(n) {
  const out = [];
  while (n > 0x7f) {
    out.push((n % 0x80) | 0x80);
    n = Math.floor(n / 0x80);
  }
  out.push(n);
  return out;
}

function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

const key = (field, wire) => Uint8Array.from(varint(field * 8 + wire));
const lenField = (field, bytes) => concat([key(field, LEN), Uint8Array.from(varint(bytes.length)), bytes]);

function float32Field(field, value) {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setFloat32(0, value, true);
  return concat([key(field, I32), b]);
}

// ClassifyRequest { repeated Image images = 1; string model = 2; optional float min_confidence = 3;
//                   bool return_model_input = 5 }, Image { bytes encoded = 1 }
function encodeClassifyRequest({ image, model, minConfidence }) {
  const parts = [lenField(1, lenField(1, image))];
  if (model) parts.push(lenField(2, utf8.encode(model)));
  if (minConfidence !== null) parts.push(float32Field(3, minConfidence));
  parts.push(key(5, VARINT), Uint8Array.of(1));
  return concat(parts);
}

// Splits a message into its fields: field number -> [{ wire, value }], value a Number for varints and a byte
// view otherwise. Unknown fields are kept and ignored, as protobuf requires.
function decodeFields(bytes) {
  const fields = new Map();
  let i = 0;
  const readVarint = () => {
    let n = 0, scale = 1, b;
    do {
      if (i >= bytes.length) throw new Error('truncated protobuf message');
      b = bytes[i++];
      n += (b & 0x7f) * scale;
      scale *= 0x80;
    } while (b & 0x80);
    return n;
  };
  const take = (len) => {
    if (i + len > bytes.length) throw new Error('truncated protobuf message');
    const v = bytes.subarray(i, i + len);
    i += len;
    return v;
  };
  while (i < bytes.length) {
    const k = readVarint();
    const field = Math.floor(k / 8), wire = k % 8;
    let value;
    if (wire === VARINT) value = readVarint();
    else if (wire === I64) value = take(8);
    else if (wire === LEN) value = take(readVarint());
    else if (wire === I32) value = take(4);
    else throw new Error(`unsupported protobuf wire type ${wire}`);
    if (!fields.has(field)) fields.set(field, []);
    fields.get(field).push({ wire, value });
  }
  return fields;
}

const f32 = (b) => new DataView(b.buffer, b.byteOffset, 4).getFloat32(0, true);
const last = (fields, n) => { const all = fields.get(n); return all ? all[all.length - 1] : undefined; };
const num = (fields, n) => last(fields, n)?.value ?? 0;
const bool = (fields, n) => num(fields, n) !== 0;
const str = (fields, n) => { const f = last(fields, n); return f ? fromUtf8.decode(f.value) : ''; };
const bytesOf = (fields, n) => last(fields, n)?.value ?? new Uint8Array(0);
const float = (fields, n) => { const f = last(fields, n); return f ? f32(f.value) : 0; };
const messages = (fields, n, decode) => (fields.get(n) ?? []).map((f) => decode(decodeFields(f.value)));
const message = (fields, n, decode) => { const f = last(fields, n); return f ? decode(decodeFields(f.value)) : null; };

// repeated float: packed (proto3's default) or one element per field.
function floats(fields, n) {
  const out = [];
  for (const { wire, value } of fields.get(n) ?? []) {
    if (wire === I32) out.push(f32(value));
    else for (let o = 0; o + 4 <= value.length; o += 4) out.push(f32(value.subarray(o, o + 4)));
  }
  return out;
}

const decodePrediction = (f) => ({
  classId: num(f, 1), className: str(f, 2), probability: float(f, 3), probabilities: floats(f, 4), oodScore: float(f, 5),
});
const decodeClassification = (f) => ({
  prediction: message(f, 1, decodePrediction), accepted: bool(f, 2), reason: num(f, 3), detail: str(f, 4),
  modelInput: bytesOf(f, 5),
});
const decodeClassifyResponse = (f) => ({
  results: messages(f, 1, decodeClassification), model: str(f, 2), modelVersion: str(f, 3),
});
const decodeClassInfo = (f) => ({ id: num(f, 1), name: str(f, 2), description: str(f, 3) });
const decodeModelInfo = (f) => ({
  name: str(f, 1), version: str(f, 2), isDefault: bool(f, 4), classes: messages(f, 6, decodeClassInfo),
  testAccuracy: float(f, 7),
});
const decodeThresholds = (f) => ({ minConfidence: float(f, 1) });
const decodeGetModelInfoResponse = (f) => ({
  models: messages(f, 1, decodeModelInfo), thresholds: message(f, 2, decodeThresholds),
});

// ---- gRPC-Web: one unary call ------------------------------------------------------------------------------

const CODES = ['OK', 'CANCELLED', 'UNKNOWN', 'INVALID_ARGUMENT', 'DEADLINE_EXCEEDED', 'NOT_FOUND', 'ALREADY_EXISTS',
  'PERMISSION_DENIED', 'RESOURCE_EXHAUSTED', 'FAILED_PRECONDITION', 'ABORTED', 'OUT_OF_RANGE', 'UNIMPLEMENTED',
  'INTERNAL', 'UNAVAILABLE', 'DATA_LOSS', 'UNAUTHENTICATED'];

class RpcError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

function decodeGrpcMessage(text) {
  try { return decodeURIComponent(text); } catch { return text; }
}

// Body: frames of [flag byte][4-byte big-endian length][payload]; flag 0x80 marks the trailers frame, whose
// payload is HTTP/1-style "name: value\r\n" lines. A call that fails before any message may instead answer
// "trailers-only": grpc-status in the HTTP headers and an empty body.
async function unaryCall(path, request, timeoutSeconds = 30) {
  const body = new Uint8Array(5 + request.length);
  new DataView(body.buffer).setUint32(1, request.length, false);
  body.set(request, 5);
  let response;
  try {
    response = await fetch(path, {
      method: 'POST',
      headers: {
        'content-type': 'application/grpc-web+proto',
        'accept': 'application/grpc-web+proto',
        'x-grpc-web': '1',
        'grpc-timeout': `${timeoutSeconds}S`,
      },
      body,
    });
  } catch (e) {
    throw new RpcError('UNAVAILABLE', `cannot reach the server (${e.message})`);
  }
  if (!response.ok) throw new RpcError('UNAVAILABLE', `HTTP ${response.status} ${response.statusText}`);
  const data = new Uint8Array(await response.arrayBuffer());
  const trailers = new Map();
  for (const name of ['grpc-status', 'grpc-message']) {
    if (response.headers.has(name)) trailers.set(name, response.headers.get(name));
  }
  let payload = null;
  for (let o = 0; o + 5 <= data.length;) {
    const flag = data[o];
    const len = new DataView(data.buffer, data.byteOffset + o + 1, 4).getUint32(0, false);
    const frame = data.subarray(o + 5, o + 5 + len);
    o += 5 + len;
    if (flag & 0x80) {
      for (const line of fromUtf8.decode(frame).split('\r\n')) {
        const colon = line.indexOf(':');
        if (colon > 0) trailers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
      }
    } else {
      payload = frame;
    }
  }
  const status = Number(trailers.get('grpc-status') ?? 2);
  if (status !== 0) {
    throw new RpcError(CODES[status] ?? `code ${status}`, decodeGrpcMessage(trailers.get('grpc-message') ?? ''));
  }
  if (payload === null) throw new RpcError('INTERNAL', 'the server sent no response message');
  return payload;
}

// ---- the page ----------------------------------------------------------------------------------------------

const REASONS = {
  0: ['REASON_UNSPECIFIED', 'unspecified'],
  1: ['REASON_ACCEPTED', 'passed every check'],
  2: ['REASON_LOW_CONFIDENCE', 'low confidence'],
  3: ['REASON_MOSTLY_DARK', 'mostly dark'],
  4: ['REASON_MOSTLY_BRIGHT', 'mostly bright'],
  5: ['REASON_LOW_CONTRAST', 'low contrast'],
  6: ['REASON_UNDECODABLE', 'not a readable image'],
  7: ['REASON_WRONG_SIZE', 'wrong size'],
  8: ['REASON_TOO_LARGE', 'image too large'],
  9: ['REASON_OUT_OF_DISTRIBUTION', 'does not look like a garment'],
  10: ['REASON_TINY_OBJECT', 'only a dot or a line on the background'],
};

const HINTS = {
  RESOURCE_EXHAUSTED: 'The server is busy (its queue is full). Try again in a moment.',
  UNAVAILABLE: 'The server is unavailable (stopped, restarting or draining). Reload the page when it is back.',
  DEADLINE_EXCEEDED: 'The server did not answer in time. Try again.',
  INVALID_ARGUMENT: 'The server rejected the request.',
};

const $ = (id) => document.getElementById(id);
let modelInfo = null; // GetModelInfoResponse, when the server answered it
let currentFile = null;
let callNumber = 0;

function showError(err) {
  const hint = HINTS[err.code] ?? 'The call failed.';
  $('error').textContent = `${hint}\n${err.code ?? 'ERROR'}: ${err.message}`;
  $('error').hidden = false;
}

function classesOf(modelName) {
  const models = modelInfo?.models ?? [];
  return (models.find((m) => m.name === modelName) ?? models.find((m) => m.isDefault))?.classes ?? [];
}

function drawModelInput(pixels) {
  const canvas = $('model-input');
  const ctx = canvas.getContext('2d');
  if (pixels.length !== 28 * 28) {
    ctx.clearRect(0, 0, 28, 28);
    return;
  }
  const image = ctx.createImageData(28, 28);
  pixels.forEach((v, i) => {
    image.data.set([v, v, v, 255], i * 4);
  });
  ctx.putImageData(image, 0, 0);
}

function drawBars(probabilities, topClass, classes) {
  const list = $('bars');
  list.replaceChildren();
  probabilities.forEach((p, id) => {
    const li = document.createElement('li');
    li.dataset.classId = id;
    if (id === topClass) li.className = 'top';
    const name = document.createElement('span');
    name.textContent = classes[id]?.name ?? `class ${id}`;
    const bar = document.createElement('span');
    bar.className = 'bar';
    const fill = document.createElement('span');
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    const value = document.createElement('span');
    value.className = 'value';
    value.textContent = `${(100 * p).toFixed(1)}%`;
    li.append(name, bar, value);
    list.append(li);
  });
}

function showResult(response) {
  const r = response.results[0];
  if (!r) throw new RpcError('INTERNAL', 'the response has no result');
  const classes = classesOf(response.model);
  const [reasonCode, reasonText] = REASONS[r.reason] ?? [`REASON_${r.reason}`, `reason ${r.reason}`];
  const section = $('result');
  section.dataset.accepted = r.accepted;
  section.dataset.reason = reasonCode;

  drawModelInput(r.modelInput);
  const p = r.prediction;
  $('class').textContent = p ? p.className : 'no prediction';
  $('probability').textContent = p ? `probability ${(100 * p.probability).toFixed(1)}%` : 'the image never reached the model';
  $('status').textContent = r.accepted ? 'accepted' : 'rejected';
  $('status').className = `status ${r.accepted ? 'accepted' : 'rejected'}`;
  $('reason').textContent = r.accepted ? '' : reasonText;
  $('reason').title = reasonCode;
  $('detail').textContent = r.detail;
  const description = p ? classes[p.classId]?.description : '';
  $('description').textContent = description ?? '';
  $('info').hidden = !description;
  drawBars(p ? p.probabilities : [], p?.classId, classes);
  $('answered-by').textContent = `Model ${response.model} ${response.modelVersion}`;
  section.hidden = false;
}

async function classify() {
  if (!currentFile) return;
  const mine = ++callNumber;
  $('error').hidden = true;
  if ($('original').src) URL.revokeObjectURL($('original').src);
  $('original').src = URL.createObjectURL(currentFile);
  const minConfidence = $('min-confidence').value === '' ? null : Number($('min-confidence').value);
  try {
    const image = new Uint8Array(await currentFile.arrayBuffer());
    const request = encodeClassifyRequest({ image, model: $('model').value, minConfidence });
    const response = decodeClassifyResponse(decodeFields(await unaryCall(CLASSIFY, request)));
    if (mine === callNumber) { showResult(response); showDrift(); }
  } catch (err) {
    if (mine === callNumber) {
      $('result').hidden = true;
      showError(err);
    }
  }
}

function pick(file) {
  if (!file) return;
  currentFile = file;
  classify();
}

async function loadModelInfo() {
  try {
    modelInfo = decodeGetModelInfoResponse(decodeFields(await unaryCall(GET_MODEL_INFO, new Uint8Array(0))));
    const select = $('model');
    for (const m of modelInfo.models) {
      const option = document.createElement('option');
      option.value = m.name;
      option.textContent = `${m.name}${m.isDefault ? ' (default)' : ''}`;
      select.append(option);
    }
    const described = modelInfo.models.map((m) =>
      `${m.name} ${m.version} (test accuracy ${(100 * m.testAccuracy).toFixed(1)}%${m.isDefault ? ', default' : ''})`);
    const min = modelInfo.thresholds?.minConfidence;
    $('server').textContent = `Models: ${described.join('; ')}.` +
      (min !== undefined ? ` Accepted when the top probability is at least ${min.toFixed(2)} and every input check passes.` : '');
    $('min-confidence').placeholder = min !== undefined ? min.toFixed(2) : 'server';
  } catch (err) {
    $('server').textContent = `Model information unavailable: ${err.code}: ${err.message}`;
  }
  document.body.dataset.ready = 'true';
}

// The class mix of the model answering (the one chosen, else the default), since it was loaded, beside its
// validation reference (GET /v2/models/{name}/drift, docs/drift.md).
async function showDrift() {
  const name = $('model').value || modelInfo?.models?.find((m) => m.isDefault)?.name;
  if (!name) return;
  try {
    const response = await fetch(`/v2/models/${encodeURIComponent(name)}/drift`);
    if (!response.ok) return;
    const drift = await response.json();
    const percent = (x) => (x === null || x === undefined ? '–' : `${(100 * x).toFixed(1)}%`);
    $('drift-summary').textContent = `${drift.name} ${drift.version}: ${drift.live_images} images here` +
      (drift.reference_images ? `; ${drift.reference_images} validation images` : '; no validation reference');
    const body = $('drift-table').querySelector('tbody');
    body.replaceChildren(...drift.classes.map((c) => {
      const row = document.createElement('tr');
      for (const text of [c.name, percent(drift.live_images ? c.live_share : null), percent(c.reference_share)]) {
        const cell = document.createElement('td');
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    }));
    $('drift').hidden = false;
  } catch (err) {
    // The mix is a side panel: the page works without it.
  }
}

function wire() {
  const drop = $('drop');
  $('file').addEventListener('change', (e) => pick(e.target.files[0]));
  drop.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('file').click(); }
  });
  drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
  drop.addEventListener('dragleave', () => drop.classList.remove('over'));
  drop.addEventListener('drop', (e) => {
    e.preventDefault();
    drop.classList.remove('over');
    pick(e.dataTransfer.files[0]);
  });
  document.addEventListener('paste', (e) => pick([...e.clipboardData.files].find((f) => f.type.startsWith('image/'))));
  $('model').addEventListener('change', () => { classify(); showDrift(); });
  $('min-confidence').addEventListener('change', classify);
}

wire();
loadModelInfo().then(showDrift);

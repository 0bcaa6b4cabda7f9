#!/usr/bin/env node
// Classify image files with fmnist-serve's gRPC API (fashion_mnist.v1.Classifier), from Node.js.
//
//     cd clients/node && npm ci
//     node classify.js --addr localhost:50051 shoe.png shirt.jpg
//
// The stubs are built at run time from proto/ by @grpc/proto-loader: nothing to generate. Prints one row per
// file (class, probability, accepted, reason, the server's explanation), or one JSON object per file with
// --json. A rejected image is a normal answer, not an error.
//
// Exit status, as clients/python/classify.py: 0 every file got an answer; 1 a file could not be read or the
// call failed otherwise; 2 bad usage; 3 the server is unreachable, unavailable or did not answer in time; 4 the
// server rejected the request (INVALID_ARGUMENT); 5 the server stayed busy (RESOURCE_EXHAUSTED) through every
// retry.
"use strict";

const fs = require("node:fs");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const EXIT = { failed: 1, usage: 2, unreachable: 3, invalid: 4, busy: 5 };
const PROTO_DIR = process.env.FMNIST_PROTO_DIR || path.resolve(__dirname, "../../proto");

// The retry policy as a gRPC service config, as docs/clients.md gives it for every language: UNAVAILABLE (a
// replica going away between resolution and the call) is retried by the channel; RESOURCE_EXHAUSTED (the
// queue stayed full) is retried below, with jittered backoff, since it needs a longer wait. Classify has no
// side effects, so a retry never applies a call twice.
const SERVICE_CONFIG = {
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    {
      name: [{ service: "fashion_mnist.v1.Classifier" }],
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: "0.05s",
        maxBackoff: "1s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
};

function usage(message) {
  process.stderr.write(`error: ${message}\n`);
  process.stderr.write(
    "usage: classify.js [--addr HOST:PORT] [--model NAME] [--json] [--raw] [--timeout S] [--retries N]\n" +
      "                   [--tls-ca PEM [--tls-cert PEM --tls-key PEM] [--tls-domain NAME]] FILE...\n",
  );
  process.exit(EXIT.usage);
}

function parseArgs(argv) {
  const env = process.env;
  const args = {
    addr: env.FMNIST_ADDR || "localhost:50051",
    model: "",
    json: false,
    raw: false,
    timeout: 10,
    retries: 3,
    tlsCa: env.FMNIST_CLIENT_TLS_CA,
    tlsCert: env.FMNIST_CLIENT_TLS_CERT,
    tlsKey: env.FMNIST_CLIENT_TLS_KEY,
    tlsDomain: undefined,
    files: [],
  };
  const valued = {
    "--addr": "addr",
    "--model": "model",
    "--timeout": "timeout",
    "--retries": "retries",
    "--tls-ca": "tlsCa",
    "--tls-cert": "tlsCert",
    "--tls-key": "tlsKey",
    "--tls-domain": "tlsDomain",
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--json") args.json = true;
    else if (a === "--raw") args.raw = true;
    else if (a in valued) {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      args[valued[a]] = argv[++i];
    } else if (a.startsWith("--")) usage(`unknown option ${a}`);
    else args.files.push(a);
  }
  args.timeout = Number(args.timeout);
  args.retries = Number.parseInt(args.retries, 10);
  if (!(args.timeout > 0)) usage("--timeout must be a positive number of seconds");
  if (!(args.retries >= 0)) usage("--retries must be a whole number");
  if (args.files.length === 0) usage("no files to classify");
  if (!args.tlsCert !== !args.tlsKey) usage("--tls-cert and --tls-key go together");
  if (args.tlsCert && !args.tlsCa) usage("--tls-cert needs --tls-ca: the client certificate is presented over TLS");
  return args;
}

function credentials(args) {
  if (!args.tlsCa) return grpc.credentials.createInsecure();
  const read = (p) => fs.readFileSync(p);
  return grpc.credentials.createSsl(
    read(args.tlsCa),
    args.tlsKey ? read(args.tlsKey) : null,
    args.tlsCert ? read(args.tlsCert) : null,
  );
}

function client(args) {
  const definition = protoLoader.loadSync("fashion_mnist/v1/classifier.proto", {
    includeDirs: [PROTO_DIR],
    keepCase: false,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(definition).fashion_mnist.v1;
  const options = {
    "grpc.service_config": JSON.stringify(SERVICE_CONFIG),
    "grpc.max_receive_message_length": 64 << 20,
  };
  if (args.tlsDomain) options["grpc.ssl_target_name_override"] = args.tlsDomain;
  return new pkg.Classifier(args.addr, credentials(args), options);
}

class ClientError extends Error {
  constructor(message, exitCode) {
    super(message);
    this.exitCode = exitCode;
  }
}

function call(stub, method, request, timeoutS) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + timeoutS * 1000);
    stub[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

/** What a failed call means to the person running this. */
function explain(err, args) {
  const s = grpc.status;
  switch (err.code) {
    case s.UNAVAILABLE:
      return new ClientError(`server ${args.addr} unavailable: ${err.details}`, EXIT.unreachable);
    case s.DEADLINE_EXCEEDED:
      return new ClientError(`server ${args.addr} did not answer within ${args.timeout} s`, EXIT.unreachable);
    case s.INVALID_ARGUMENT:
      return new ClientError(`the server rejected the request: ${err.details}`, EXIT.invalid);
    case s.RESOURCE_EXHAUSTED:
      return new ClientError(`the server stayed busy through ${args.retries} retries: ${err.details}`, EXIT.busy);
    default:
      return new ClientError(`call failed (${s[err.code] ?? err.code}): ${err.details}`, EXIT.failed);
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** One Classify call, retried with jittered exponential backoff while the server says its queue is full. */
async function classify(stub, request, args) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await call(stub, "classify", request, args.timeout);
    } catch (err) {
      if (err.code !== grpc.status.RESOURCE_EXHAUSTED || attempt >= args.retries) throw explain(err, args);
      const delay = Math.min(2, 0.1 * 2 ** attempt) * (0.5 + Math.random());
      process.stderr.write(`server busy, retrying in ${delay.toFixed(2)} s\n`);
      await sleep(delay * 1000);
    }
  }
}

/** The server's own limit on images per call (GetModelInfo), so calls are split as the server wants them. */
async function imagesPerCall(stub, args) {
  try {
    const info = await call(stub, "getModelInfo", {}, args.timeout);
    return info.limits?.maxImagesPerRequest || 64;
  } catch (err) {
    throw explain(err, args);
  }
}

function image(file, args) {
  const data = fs.readFileSync(file);
  return args.raw ? { raw: data } : { encoded: data };
}

function print(results, args) {
  if (args.json) {
    for (const r of results) process.stdout.write(JSON.stringify(r) + "\n");
    return;
  }
  const rows = [["FILE", "CLASS", "PROBABILITY", "ACCEPTED", "REASON", "DETAIL"]].concat(
    results.map((r) => [r.file, r.class, r.probability.toFixed(4), r.accepted ? "yes" : "no", r.reason, r.detail]),
  );
  const widths = rows[0].map((_, c) => Math.max(...rows.map((row) => String(row[c]).length)));
  for (const row of rows) {
    process.stdout.write(row.map((cell, c) => String(cell).padEnd(widths[c])).join("  ").trimEnd() + "\n");
  }
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  let images;
  try {
    images = args.files.map((f) => image(f, args));
  } catch (err) {
    throw new ClientError(`cannot read ${err.path}: ${err.code}`, EXIT.failed);
  }
  const stub = client(args);
  try {
    const perCall = await imagesPerCall(stub, args);
    const results = [];
    for (let start = 0; start < images.length; start += perCall) {
      const request = { images: images.slice(start, start + perCall), model: args.model };
      const reply = await classify(stub, request, args);
      reply.results.forEach((v, i) => {
        // proto3 leaves out a field at its default; `defaults: true` fills them in, so class 0 (T-shirt/top)
        // comes back as classId 0, not as a missing field.
        const p = v.prediction ?? {};
        results.push({
          file: args.files[start + i],
          class: p.className,
          classId: p.classId,
          probability: p.probability,
          accepted: v.accepted,
          reason: v.reason,
          detail: v.detail,
          model: reply.model,
          modelVersion: reply.modelVersion,
        });
      });
    }
    print(results, args);
  } finally {
    stub.close();
  }
}

main().catch((err) => {
  process.stderr.write(`error: ${err.message}\n`);
  process.exit(err.exitCode ?? EXIT.failed);
});

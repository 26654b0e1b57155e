// A Node.js client of modalink.v1.Assistant, as another team would write one: @grpc/grpc-js with
// @grpc/proto-loader reading protos/ as they are (no generated code), and no deadline on any call.
//
//   node tests/node/client.mjs HOST:PORT IMAGE.png
//
// Prints one JSON object with what every call answered (tests/test_any_client.py checks it).
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const [address, imagePath] = process.argv.slice(2);
const protos = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "protos");
const definition = protoLoader.loadSync("modalink/v1/assistant.proto", {
  includeDirs: [protos], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const { modalink } = grpc.loadPackageDefinition(definition);
const client = new modalink.v1.Assistant(address, grpc.credentials.createInsecure());

const png = readFileSync(imagePath);
const image = { image: { data: png, mime: "image/png" } };
const question = "What is shown in this picture?";

// A unary call without a deadline: resolves to {ok} or {error: {code, details}}.
const call = (method, request) => new Promise((resolve) => {
  client[method](request, (err, res) => resolve(err ? { error: { code: err.code, details: err.details } } : { ok: res }));
});

function generate(request) {
  return new Promise((resolve) => {
    const out = { text: "", messages: 0, adapter_versions: null, finish_reason: "", usage: null };
    const stream = client.Generate(request);
    stream.on("data", (msg) => {
      out.messages += 1;
      out.text += msg.text;
      if (out.adapter_versions === null) out.adapter_versions = msg.adapter_versions;
      if (msg.finish_reason) { out.finish_reason = msg.finish_reason; out.usage = msg.usage; }
    });
    stream.on("error", (err) => resolve({ error: { code: err.code, details: err.details } }));
    stream.on("end", () => resolve({ ok: out }));
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const result = {};
result.generate = await generate({ parts: [{ text: question }, image], params: { max_new_tokens: 16 } });
const embed = await call("Embed", { part: image });
result.embed = embed.error ? embed : {
  ok: { dtype: embed.ok.embeddings.dtype, shape: embed.ok.embeddings.shape.map(Number),
        bytes: embed.ok.embeddings.data.length, adapter_version: embed.ok.adapter_version,
        modality: embed.ok.modality },
};
result.caption = await call("Caption", { part: image, params: { max_new_tokens: 16 } });
const rows = [0, 1, 2].map((i) => JSON.stringify({
  id: `node${i}`, modality: "image", uri: `data:image/png;base64,${png.toString("base64")}`,
})).join("\n");
const job = await call("SubmitCaptionJob", { manifest_jsonl: rows, params: { max_new_tokens: 16 } });
result.job = job;
if (job.ok) {
  let state = job.ok;
  for (let i = 0; i < 600 && state.state === "running"; i++) {
    await sleep(500);
    const polled = await call("GetJob", { job_id: job.ok.job_id });
    if (polled.error) { result.poll = polled; break; }
    state = polled.ok;
  }
  result.job_final = state;
  result.job_results = state.results ? readFileSync(state.results, "utf8") : null;
}
// The generic media part (modality by name, as a plugin's media travels): the same picture, the same answers.
const media = { media: { modality: "image", data: png, mime: "image/png" } };
result.media_generate = await generate({ parts: [{ text: question }, media], params: { max_new_tokens: 16 } });
const mediaEmbed = await call("Embed", { part: media });
result.media_embed = mediaEmbed.error ? mediaEmbed : { ok: { shape: mediaEmbed.ok.embeddings.shape.map(Number),
  data: mediaEmbed.ok.embeddings.data.toString("base64"), modality: mediaEmbed.ok.modality } };
result.media_unknown = await call("Embed", { part: { media: { modality: "smell", data: png } } });
result.media_tensor_for_a_file = await call("Embed", {
  part: { media: { modality: "image", tensor: { dtype: "float32", shape: [1, 1], data: Buffer.alloc(4) } } },
});
result.adapters = await call("ListAdapters", {});
result.bad_input = await generate({ parts: [{ text: question }, { image: { data: Buffer.from("not a picture") } }] });
client.close();
process.stdout.write(JSON.stringify(result) + "\n");

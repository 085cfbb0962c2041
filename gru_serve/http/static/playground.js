// The gru-serve playground: plain JavaScript over the public HTTP API, nothing else.
//   GET  /v1/models                  the model list
//   POST /v1/sessions                a session (the server keeps its state)
//   POST /v1/sessions/{id}/fork      a copy of it under a new id
//   POST /v1/completions             stream: true, session_id: server-sent events
// Model text is only ever written with textContent / text nodes, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

const ui = {
  model: $("model"),
  // The sampling options' inputs: each names its completions field (an OpenAI or gru-serve
  // sampling option) in data-option; step="1" marks a whole number.
  options: document.querySelectorAll("[data-option]"),
  maxTokens: $("max-tokens"),
  seed: $("seed"),
  token: $("token"),
  prompt: $("prompt"),
  generate: $("generate"),
  continue: $("continue"),
  fork: $("fork"),
  newSession: $("new-session"),
  stop: $("stop"),
  message: $("message"),
  output: $("output"),
  session: $("session"),
  tokensSeen: $("tokens-seen"),
  turn: $("turn"),
  seedUsed: $("seed-used"),
  ttft: $("ttft"),
  tps: $("tps"),
  finish: $("finish"),
};

// session: {id, model, tokensSeen} of the session the output belongs to, or null.
const state = { session: null, controller: null, busy: false, runs: 0 };

class ApiError extends Error {}

function say(text, kind = "info") {
  ui.message.textContent = text;
  ui.message.dataset.kind = kind;
}

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  const token = ui.token.value.trim();
  if (token) h.authorization = `Bearer ${token}`;
  return h;
}

// fetch, with a non-2xx answer turned into an ApiError carrying the server's message.
// `body`: an object, or a string that is already JSON.
async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: headers(body !== undefined), signal };
  if (body !== undefined) init.body = typeof body === "string" ? body : JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const data = await response.json();
      const error = data && data.error;
      message = (error && (error.message || error)) || message;
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(`${method} ${path}: ${message}`);
  }
  return response;
}

// The `data:` payloads of a server-sent event stream, as they arrive.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buffer += decoder.decode(value, { stream: true });
    if (done) buffer += decoder.decode() + "\n\n";
    buffer = buffer.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
    if (done) return;
  }
}

function setBusy(busy) {
  state.busy = busy;
  ui.generate.disabled = busy;
  ui.continue.disabled = busy || !state.session;
  ui.fork.disabled = busy || !state.session;
  ui.newSession.disabled = busy;
  ui.stop.disabled = true; // enabled by run() once there is a stream to stop
  ui.output.setAttribute("aria-busy", String(busy));
}

function showSession() {
  const s = state.session;
  ui.session.textContent = s ? s.id : "none";
  ui.session.title = s ? `model ${s.model}` : "";
  ui.tokensSeen.textContent = s ? String(s.tokensSeen) : "0";
}

function adopt(json) {
  state.session = { id: json.session_id, model: json.model, tokensSeen: json.tokens_seen };
  showSession();
}

function resetStats() {
  for (const el of [ui.turn, ui.seedUsed, ui.ttft, ui.tps, ui.finish]) el.textContent = "-";
}

function span(className, text) {
  const el = document.createElement("span");
  el.className = className;
  el.textContent = text;
  ui.output.append(el);
  return el;
}

function numberOr(input, parse) {
  const raw = input.value.trim();
  return raw === "" ? undefined : parse(raw);
}

function sampling() {
  const options = {};
  for (const el of ui.options) {
    options[el.dataset.option] = numberOr(el, el.step === "1" ? (v) => parseInt(v, 10) : parseFloat);
  }
  return options;
}

// Seeds are 64-bit: more than a JavaScript number holds exactly, so they travel as digits,
// spliced into the JSON text both ways.
function seedDigits() {
  const raw = ui.seed.value.trim();
  if (raw !== "" && !/^\d{1,20}$/.test(raw)) throw new ApiError("Seed: a whole number from 0 (blank: random).");
  return raw;
}

function withSeed(body, digits) {
  const json = JSON.stringify(body);
  return digits ? `${json.slice(0, -1)},"seed":${digits}}` : json;
}

// Sends `prompt` (possibly empty) to the current session and streams the continuation.
async function run(prompt) {
  const seed = seedDigits();
  const s = state.session;
  const body = {
    model: s.model,
    prompt,
    max_tokens: numberOr(ui.maxTokens, (v) => parseInt(v, 10)),
    ...sampling(),
    stream: true,
    stream_options: { include_usage: true }, // a last chunk that counts the tokens
    session_id: s.id,
  };
  state.controller = new AbortController();
  ui.stop.disabled = false;
  ui.output.dataset.state = "streaming";
  resetStats();
  const added = [];
  if (prompt) added.push(span("prompt", prompt));
  const gen = span("gen", "");
  added.push(gen);
  const t0 = performance.now();
  let tFirst = 0;
  let chunks = 0; // a chunk holds the tokens the server had ready together: one or more
  let last = null; // the chunk that carries finish_reason (and the gru_serve object)
  let usage = null;
  let seedUsed = "";
  try {
    const response = await api("/v1/completions", {
      method: "POST",
      body: withSeed(body, seed),
      signal: state.controller.signal,
    });
    say("Generating…");
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(chunk.error.message || String(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.text) {
        if (!tFirst) {
          tFirst = performance.now();
          ui.ttft.textContent = (tFirst - t0).toFixed(1);
        }
        chunks += 1;
        const follow = atBottom();
        gen.append(choice.text); // a text node: never parsed as HTML
        if (follow) ui.output.scrollTop = ui.output.scrollHeight;
      }
      if (choice.finish_reason) {
        last = chunk;
        seedUsed = (data.match(/"seed":\s*(\d+)/) || [])[1] || "";
      }
    }
    if (!last) throw new ApiError("the stream ended without a finish reason");
    const tEnd = performance.now();
    finish(last, usage ? usage.completion_tokens : chunks, seedUsed, t0, tFirst, tEnd);
    ui.output.dataset.state = "done";
  } catch (error) {
    // The request either committed or left the session as it was: drop what it showed.
    for (const el of added) el.remove();
    if (error.name === "AbortError") {
      say("Stopped: the session is as it was before this request.");
      ui.output.dataset.state = "stopped";
    } else {
      say(error.message || String(error), "error");
      ui.output.dataset.state = "error";
    }
  } finally {
    state.controller = null;
  }
}

function finish(chunk, count, seed, t0, tFirst, tEnd) {
  const extra = chunk.gru_serve || {};
  if (extra.session_id) state.session.id = extra.session_id;
  if (extra.tokens_seen !== undefined) state.session.tokensSeen = extra.tokens_seen;
  showSession();
  ui.turn.textContent = extra.turn !== undefined ? String(extra.turn) : "-";
  ui.seedUsed.textContent = seed || "-";
  ui.finish.textContent = chunk.choices[0].finish_reason;
  if (extra.time_to_first_token_s !== undefined) {
    ui.ttft.title = `server: ${(extra.time_to_first_token_s * 1000).toFixed(1)} ms`;
  }
  if (!tFirst) ui.ttft.textContent = (tEnd - t0).toFixed(1);
  // Over the whole request, first token included: the server sends tokens that are ready
  // together (a fused run) in one chunk, so the gaps between chunks are no rate.
  ui.tps.textContent = (count / ((tEnd - t0) / 1000)).toFixed(1);
  const why = chunk.choices[0].finish_reason === "length" ? "max tokens reached" : "the model stopped";
  say(`${count} tokens, ${why}.`);
}

function atBottom() {
  const o = ui.output;
  return o.scrollHeight - o.scrollTop - o.clientHeight < 24;
}

// One action at a time; errors go to the message line.
function action(fn) {
  return async () => {
    if (state.busy) return;
    setBusy(true);
    try {
      await fn();
    } catch (error) {
      say(error.message || String(error), "error");
      ui.output.dataset.state = "error";
    } finally {
      setBusy(false);
      state.runs += 1; // data-runs: actions ended, for whoever waits on one (the tests)
      ui.output.dataset.runs = String(state.runs);
    }
  };
}

function clearSession() {
  state.session = null;
  ui.output.replaceChildren();
  ui.output.dataset.state = "idle";
  showSession();
  resetStats();
}

const onGenerate = action(async () => {
  if (!ui.model.value) throw new ApiError("No model: is the server up, and is the token right?");
  seedDigits(); // a bad seed is refused before a session is made
  clearSession();
  ui.output.dataset.state = "streaming"; // not "done" while the session is being made
  const response = await api("/v1/sessions", { method: "POST", body: { model: ui.model.value } });
  adopt(await response.json());
  await run(ui.prompt.value);
});

const onContinue = action(() => run(ui.prompt.value));

const onFork = action(async () => {
  const from = state.session.id;
  const response = await api(`/v1/sessions/${encodeURIComponent(from)}/fork`, { method: "POST" });
  const fork = await response.json();
  adopt(fork);
  say(`Forked ${from} into ${fork.session_id}: Continue goes on the fork.`);
});

const onNewSession = action(async () => {
  clearSession();
  say("New session: Generate starts it from the prompt.");
});

async function loadModels() {
  try {
    const response = await api("/v1/models");
    const { data } = await response.json();
    const previous = ui.model.value;
    ui.model.replaceChildren(
      ...data.map((m) => {
        const option = document.createElement("option");
        option.value = m.id;
        option.textContent = m.id;
        return option;
      }),
    );
    if (data.some((m) => m.id === previous)) ui.model.value = previous;
    say(data.length ? "Ready." : "The server lists no models.", data.length ? "info" : "error");
  } catch (error) {
    say(`${error.message} (a bearer token may be needed)`, "error");
  }
}

ui.generate.addEventListener("click", onGenerate);
ui.continue.addEventListener("click", onContinue);
ui.fork.addEventListener("click", onFork);
ui.newSession.addEventListener("click", onNewSession);
ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
ui.token.addEventListener("change", loadModels);
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    (state.session ? onContinue : onGenerate)();
  }
});

setBusy(false);
loadModels();

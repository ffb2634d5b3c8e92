// mlflow-feedback-middleware browser client: no dependencies, an ES module.
//
//   import { idsFromResponse, readEventStream, FeedbackControl } from "/feedback/client.js";
//
//   const res = await fetch("/chat", {method: "POST", body: ...});
//   const control = new FeedbackControl(container);      // disabled until the IDs are known
//   control.setIds(idsFromResponse(res));               // or: the ids readEventStream returns
//
// Feedback that cannot be sent (offline, network error) waits in localStorage and is sent when the
// browser is back online; every vote carries an Idempotency-Key, so a retry is never counted twice.
//
// Implicit signals (what users do, not what they click) are sent only when the service's feedback schema
// declares them: `copied_answer` when text of the answer element given as `answer` is copied,
// `left_without_reacting` when the page is left with an answer nobody reacted to, and whatever the app
// reports with `control.signal(name)` (`regenerated`, `edited_question`, `stopped_stream`). Once per answer.

const TRACE_HEADER = "X-MLflow-Trace-Id";
const REQUEST_HEADER = "X-Request-ID";
const TOKEN_HEADER = "X-MLflow-Feedback-Token";
const QUEUE_KEY = "mlflow-feedback-queue";
const DEFAULT_ENDPOINT = new URL(".", import.meta.url).pathname.replace(/\/$/, "");

/** The IDs a traced response carries in its headers ({traceId, clientRequestId, feedbackToken}). */
export function idsFromResponse(response) {
  return {
    traceId: response.headers.get(TRACE_HEADER),
    clientRequestId: response.headers.get(REQUEST_HEADER),
    feedbackToken: response.headers.get(TOKEN_HEADER),
  };
}

/**
 * Read a text/event-stream response, calling onEvent(name, data) for each event but the middleware's
 * final `mlflow_trace` event, whose IDs it returns ({traceId, clientRequestId, feedbackToken}).
 */
export async function readEventStream(response, onEvent, traceEvent = "mlflow_trace") {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let ids = idsFromResponse(response);
  const handle = (block) => {
    let name = "message";
    const data = [];
    for (const line of block.split(/\r\n|\n|\r/)) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
    if (!data.length) return;
    const text = data.join("\n");
    if (name === traceEvent) {
      const payload = JSON.parse(text);
      ids = { traceId: payload.trace_id, clientRequestId: payload.client_request_id, feedbackToken: payload.feedback_token || ids.feedbackToken };
    } else if (onEvent) {
      onEvent(name, text);
    }
  };
  for (;;) {
    const { done, value } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const blocks = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = blocks.pop();
    blocks.forEach(handle);
    if (done) break;
  }
  if (buffer.trim()) handle(buffer);
  return ids;
}

function newKey() {
  return (crypto.randomUUID ? crypto.randomUUID() : String(Date.now()) + Math.random().toString(16).slice(2));
}

function readQueue() {
  try { return JSON.parse(localStorage.getItem(QUEUE_KEY) || "[]"); } catch { return []; }
}

function writeQueue(items) {
  localStorage.setItem(QUEUE_KEY, JSON.stringify(items));
}

/** Send feedback now; throws TypeError on a network failure, Error(message) on a refusal. `keepalive`: the
 * request outlives the page (for feedback sent while it is being left). */
export async function sendFeedback(endpoint, ids, body, key = newKey(), { keepalive = false } = {}) {
  const headers = { "Content-Type": "application/json", "Idempotency-Key": key };
  if (ids.feedbackToken) headers[TOKEN_HEADER] = ids.feedbackToken;
  const query = ids.traceId ? `trace_id=${encodeURIComponent(ids.traceId)}` : `client_request_id=${encodeURIComponent(ids.clientRequestId)}`;
  const response = await fetch(`${endpoint}?${query}`, { method: "POST", headers, body: JSON.stringify(body), keepalive });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(answer.message || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return answer;
}

/** Withdraw the user's votes on an answer: the thumbs, or the stored feedback `names` given. */
export function retractFeedback(endpoint, ids, names = null, key = newKey()) {
  return sendFeedback(endpoint, ids, { retract: names && names.length ? names : true }, key);
}

/** Send what waited in localStorage; items refused by the server are dropped, the rest wait on. */
export async function flushQueue() {
  const waiting = readQueue();
  const kept = [];
  for (const item of waiting) {
    try {
      await sendFeedback(item.endpoint, item.ids, item.body, item.key);
      window.dispatchEvent(new CustomEvent("mlflow-feedback-sent", { detail: item }));
    } catch (error) {
      if (error instanceof TypeError) kept.push(item);  // still offline
    }
  }
  writeQueue([...kept, ...readQueue().slice(waiting.length)]);
}

window.addEventListener("online", () => { flushQueue(); });

const schemas = new Map();  // endpoint -> its schema (one fetch per page)

/** The feedback schema the service at `endpoint` serves ({} when it cannot be read). */
export function schemaOf(endpoint) {
  if (!schemas.has(endpoint)) schemas.set(endpoint, fetch(`${endpoint}/schema`).then((r) => r.json()).catch(() => ({})));
  return schemas.get(endpoint);
}

// Controls whose answer nobody reacted to yet: told when the page is left.
const unreacted = new Set();
window.addEventListener("pagehide", () => {
  for (const control of unreacted) control.signal("left_without_reacting", { keepalive: true });
});
if (navigator.onLine && readQueue().length) flushQueue();  // left over from an earlier visit

// Thumb icons (Feather icons, MIT), inline so they render without an emoji font and follow the text colour.
const ICON = (path) =>
  `<svg aria-hidden="true" width="16" height="16" viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2"` +
  ` stroke-linecap="round" stroke-linejoin="round" style="vertical-align:-3px;margin-right:.3em"><path d="${path}"/></svg>`;
const THUMB_UP = ICON("M14 9V5a3 3 0 0 0-3-3l-4 9v11h11.28a2 2 0 0 0 2-1.7l1.38-9a2 2 0 0 0-2-2.3zM7 22H4a2 2 0 0 1-2-2v-7a2 2 0 0 1 2-2h3");
const THUMB_DOWN = ICON("M10 15v4a3 3 0 0 0 3 3l4-9V2H5.72a2 2 0 0 0-2 1.7l-1.38 9a2 2 0 0 0 2 2.3zm7-13h2.67A2.31 2.31 0 0 1 22 4v7a2.31 2.31 0 0 1-2.33 2H17");

/** An accessible thumbs-up/down control with an optional comment, and rating controls from the schema route. */
export class FeedbackControl {
  constructor(container, { endpoint = DEFAULT_ENDPOINT, comment = true, ratings = true, answer = null } = {}) {
    this.endpoint = endpoint;
    this.ids = null;
    this.sending = false;
    this.signalled = new Set();
    this.signals = new Set();  // the signals the schema declares, once it is read
    schemaOf(endpoint).then((schema) => {
      for (const field of schema.feedback || []) if (field.type === "signal") this.signals.add(field.name);
    });
    if (answer) answer.addEventListener("copy", () => this.signal("copied_answer"));
    this.root = document.createElement("div");
    this.root.className = "mlflow-feedback";
    this.root.setAttribute("role", "group");
    this.root.setAttribute("aria-label", "Rate this answer");
    this.up = this.#button("Helpful", "Good answer", true);
    this.down = this.#button("Not helpful", "Bad answer", false);
    if (comment) {
      this.comment = document.createElement("input");
      this.comment.type = "text";
      this.comment.className = "mlflow-feedback-comment";
      this.comment.placeholder = "Optional comment";
      this.comment.setAttribute("aria-label", "Comment");
      this.root.append(this.comment);
    }
    this.ratings = document.createElement("span");
    this.root.append(this.ratings);
    this.status = document.createElement("span");
    this.status.className = "mlflow-feedback-status";
    this.status.setAttribute("role", "status");
    this.status.setAttribute("aria-live", "polite");
    this.status.textContent = "waiting for the answer…";
    this.root.append(this.status);
    container.append(this.root);
    this.#enable(false);
    if (ratings) this.#loadScales();
  }

  /** The answer's IDs are known: enable the controls. */
  setIds(ids) {
    if (!ids || !(ids.traceId || ids.clientRequestId)) return;
    this.ids = ids;
    this.status.textContent = "";
    this.#enable(true);
    unreacted.add(this);
  }

  /** Report an implicit signal (`regenerated`, `edited_question`, `stopped_stream`, ...) if the service's schema
   * declares it; once per answer, never twice at once, never an error shown to the user. */
  signal(name, { keepalive = false } = {}) {
    if (!this.ids || this.signalled.has(name) || !this.signals.has(name)) return;
    this.signalled.add(name);
    unreacted.delete(this);
    sendFeedback(this.endpoint, this.ids, { signal: name }, newKey(), { keepalive }).catch(() => {});
  }

  #button(label, name, value) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = value ? "mlflow-feedback-up" : "mlflow-feedback-down";
    // An icon drawn here (no emoji font needed) and a word beside it; screen readers get the name.
    button.innerHTML = `${value ? THUMB_UP : THUMB_DOWN}<span aria-hidden="true">${label}</span>`;
    button.setAttribute("aria-label", name);
    button.setAttribute("aria-pressed", "false");
    // A pressed thumb pressed again withdraws the vote (MLflow keeps it, marked invalid).
    button.addEventListener("click", () =>
      button.getAttribute("aria-pressed") === "true" ? this.vote({ retract: true }, null) : this.vote({ is_correct: value }, button));
    this.root.append(button);
    return button;
  }

  #enable(on) {
    for (const control of this.root.querySelectorAll("button, select")) control.disabled = !on;
  }

  async #loadScales() {
    try {
      const schema = await schemaOf(this.endpoint);
      if (!schema.declared) return;
      for (const field of schema.feedback.filter((f) => f.type === "scale")) {
        const select = document.createElement("select");
        select.setAttribute("aria-label", `Rate ${field.name}`);
        select.disabled = !this.ids;
        select.append(new Option(`${field.name}…`, ""));
        for (let v = field.min; v <= field.max; v += field.step) select.append(new Option(String(v), String(v)));
        select.addEventListener("change", () => select.value && this.vote({ ratings: { [field.name]: Number(select.value) } }, select));
        this.ratings.append(select);
      }
    } catch { /* no schema route: thumbs only */ }
  }

  /** Send one vote (a request body for the feedback route; `control` null for a retraction); never twice at once. */
  async vote(body, control) {
    if (!this.ids || this.sending) return;
    this.sending = true;
    unreacted.delete(this);
    this.#enable(false);
    const text = this.comment && this.comment.value.trim();
    if (text && body.is_correct !== undefined) body = { ...body, comment: text };
    const item = { endpoint: this.endpoint, ids: this.ids, body, key: newKey() };
    this.status.textContent = "sending…";
    const sent = () => {
      if (control === null || control === this.up || control === this.down) {  // a rating leaves the thumbs be
        for (const b of [this.up, this.down]) b.setAttribute("aria-pressed", String(b === control));
      }
      this.status.textContent = body.retract ? "Vote withdrawn." : "Thanks for your feedback!";
    };
    try {
      await sendFeedback(item.endpoint, item.ids, item.body, item.key);
      sent();
    } catch (error) {
      if (error instanceof TypeError) {  // offline or the network failed: keep it for later
        writeQueue([...readQueue(), item]);
        this.status.textContent = "Offline: your feedback will be sent when you are back online.";
        window.addEventListener("mlflow-feedback-sent", (event) => {
          if (event.detail.key === item.key) sent();
        });
      } else {
        this.status.textContent = `Could not send: ${error.message}`;
      }
    } finally {
      this.sending = false;
      this.#enable(true);
    }
  }
}

// Following one generation's Server-Sent Events stream with fetch (so the Bearer header can be sent
// and nothing secret goes into a URL), with reconnects that resume after the last event seen.

import { ApiError, NetworkError, SessionEnded, backoff, reportConnection, send, waitToRetry } from "./api.js";

const IDLE_MS = 40_000; // the server pings at least every 15 s; silence this long means a dead link

/** Parse an SSE byte stream into {id, data} events (the WHATWG rules that matter here). */
export async function* readEvents(body, onChunk) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let id = null;
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        // A held-back "\r" at the very end was a line end after all: it may close the last event.
        if (buffer === "\r" && data.length) yield { id, data: data.join("\n") };
        return;
      }
      onChunk();
      buffer += decoder.decode(value, { stream: true });
      for (;;) {
        const match = /\r\n|\r|\n/.exec(buffer);
        if (!match) break;
        // A lone "\r" at the very end may be the first half of "\r\n": wait for more.
        if (match[0] === "\r" && match.index === buffer.length - 1) break;
        const line = buffer.slice(0, match.index);
        buffer = buffer.slice(match.index + match[0].length);
        if (line === "") {
          if (data.length) yield { id, data: data.join("\n") };
          id = null;
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue; // a comment: `: ping`
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "data") data.push(val);
        else if (field === "id" && !val.includes("\0")) id = val;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * Follow a generation to its `done`. Handlers:
 *   onReset()        — forget any text shown: the stream starts over from the first event
 *   onEvent(event)   — each protocol event (delta / usage / error / done), exactly once, in order
 *   onState(state)   — "live" | "retrying" (with {delayMs}) | "done" | "gone" | "session"
 * The generation itself is never stopped by close(): only the cancel route does that.
 */
export class GenerationStream {
  constructor(generationId, { streamUrl = null, onEvent, onReset = () => {}, onState = () => {} }) {
    this.generationId = generationId;
    this.streamUrl = streamUrl;
    this.onEvent = onEvent;
    this.onReset = onReset;
    this.onState = onState;
    this.lastId = 0;
    this.finished = false;
    this.closed = false;
    this.controller = null;
    this.closer = new AbortController();
    this.status = null;
    this.done = this.run();
  }

  close() {
    this.closed = true;
    this.closer.abort();
    if (this.controller) this.controller.abort();
  }

  async connect(signal) {
    const headers = { Accept: "text/event-stream" };
    if (this.lastId > 0) headers["Last-Event-ID"] = String(this.lastId);
    if (this.streamUrl) {
      // The create reply's URL carries a ticket for this one stream: no token needed (or exposed).
      try {
        return await send("GET", this.streamUrl, { headers, signal, auth: false });
      } catch (error) {
        if (!(error instanceof ApiError && (error.status === 401 || error.status === 403))) throw error;
        this.streamUrl = null; // the ticket expired: the Bearer header does the same job
      }
    }
    return send("GET", `/api/generations/${encodeURIComponent(this.generationId)}/stream`, {
      headers,
      signal,
    });
  }

  async run() {
    let failures = 0;
    while (!this.finished && !this.closed) {
      const controller = new AbortController();
      this.controller = controller;
      let idleTimer = 0;
      const kick = () => {
        clearTimeout(idleTimer);
        idleTimer = setTimeout(() => controller.abort(), IDLE_MS);
      };
      try {
        kick();
        const response = await this.connect(controller.signal);
        this.onState("live");
        if (failures > 0) reportConnection({ state: "ok" });
        let first = true;
        for await (const event of readEvents(response.body, kick)) {
          const n = Number.parseInt(event.id, 10);
          if (first && Number.isFinite(n) && n <= this.lastId) {
            // The server rebuilt the stream from the database (its buffer expired) and numbered it
            // from 1 again, ignoring Last-Event-ID: start the text over instead of doubling it.
            this.lastId = 0;
            this.onReset();
          }
          first = false;
          if (Number.isFinite(n)) {
            if (n <= this.lastId) continue; // already seen: never show text twice
            this.lastId = n;
          }
          failures = 0;
          let payload;
          try {
            payload = JSON.parse(event.data);
          } catch {
            continue;
          }
          this.onEvent(payload);
          if (payload.type === "done") {
            this.finished = true;
            this.status = payload.status;
            break;
          }
        }
      } catch (error) {
        if (this.closed) break;
        if (error instanceof SessionEnded) {
          this.onState("session");
          return null;
        }
        if (error instanceof ApiError && error.status !== 503 && error.status !== 429) {
          if (error.status === 404) {
            this.onState("gone"); // the chat (and its generation) was deleted
            return null;
          }
          if (error.status >= 400 && error.status < 500) {
            this.onState("gone");
            return null;
          }
        }
        // Network trouble, a server restart, a dead link: fall through and reconnect.
        if (!(error instanceof NetworkError) && !(error instanceof ApiError) && error?.name !== "AbortError") {
          console.warn("stream interrupted", error);
        }
      } finally {
        clearTimeout(idleTimer);
      }
      if (this.finished || this.closed) break;
      // The connection ended without `done`: resume after the last event seen.
      const delayMs = failures === 0 ? 250 : backoff(failures);
      failures += 1;
      if (failures > 1) {
        this.onState("retrying", { delayMs });
        reportConnection({ state: "retrying", delayMs, attempt: failures });
      }
      try {
        await waitToRetry(delayMs, this.closer.signal);
      } catch {
        break;
      }
    }
    if (this.finished) this.onState("done");
    return this.status;
  }
}

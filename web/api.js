// MiniChat API client: tokens, transparent refresh, errors, retries.
//
// Tokens live in localStorage so every tab shares one session. Refresh tokens rotate (a used one is
// dead), so refreshes are serialized: within a tab by one shared promise, across tabs by a Web Lock
// (navigator.locks), and inside the lock we re-read storage first — if another tab already rotated
// the pair we simply use its result instead of spending the old refresh token a second time.

const TOKENS_KEY = "minichat.tokens";
const LOCK_NAME = "minichat.token-refresh";
// Refresh proactively when less than this many ms of the access token's life remain.
const EARLY_MS = 60_000;

export class ApiError extends Error {
  constructor(status, body, headers) {
    const err = (body && body.error) || {};
    super(err.message || `Request failed (${status})`);
    this.name = "ApiError";
    this.status = status;
    this.code = err.code || (status >= 500 ? "internal_error" : "error");
    this.field = err.field;
    this.generationId = err.generationId;
    this.requestId = err.requestId;
    const retryAfter = headers && headers.get("Retry-After");
    const seconds = retryAfter != null ? Number.parseInt(retryAfter, 10) : Number(err.retryAfter);
    this.retryAfter = Number.isFinite(seconds) ? Math.max(0, seconds) : null;
  }
}

/** The network (not the server) failed: offline, server down, connection reset. */
export class NetworkError extends Error {
  constructor(cause) {
    super("Can't reach MiniChat. Check your connection.");
    this.name = "NetworkError";
    this.cause = cause;
  }
}

/** The session is over (refresh token refused): the user must sign in again. */
export class SessionEnded extends Error {
  constructor() {
    super("Your session has ended. Please sign in again.");
    this.name = "SessionEnded";
  }
}

// ---- token storage ---------------------------------------------------------------------------

export function loadTokens() {
  try {
    const raw = localStorage.getItem(TOKENS_KEY);
    const value = raw ? JSON.parse(raw) : null;
    return value && value.accessToken && value.refreshToken ? value : null;
  } catch {
    return null;
  }
}

function saveTokens(auth) {
  const value = {
    accessToken: auth.accessToken,
    refreshToken: auth.refreshToken,
    expiresAt: Date.now() + Number(auth.expiresIn || 900) * 1000,
    user: auth.user,
  };
  localStorage.setItem(TOKENS_KEY, JSON.stringify(value));
  scheduleRefresh(value);
  return value;
}

export function clearTokens() {
  localStorage.removeItem(TOKENS_KEY);
  clearTimeout(refreshTimer);
}

export function isTokensKey(key) {
  return key === TOKENS_KEY;
}

// ---- connection state (for "retrying…" banners) ----------------------------------------------

const listeners = new Set();
/** fn({state: "ok" | "retrying", delayMs, attempt}) */
export function onConnection(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}
export function reportConnection(state) {
  for (const fn of listeners) fn(state);
}

let sessionEndedHandler = () => {};
export function onSessionEnded(fn) {
  sessionEndedHandler = fn;
}

// ---- refresh -----------------------------------------------------------------------------------

let refreshing = null; // the in-tab refresh in progress
let refreshTimer = 0;

function scheduleRefresh(tokens) {
  clearTimeout(refreshTimer);
  if (!tokens) return;
  const lifetime = tokens.expiresAt - Date.now();
  // At 75% of the lifetime, and at least EARLY_MS before the end.
  const inMs = Math.max(1000, Math.min(lifetime * 0.75, lifetime - EARLY_MS));
  refreshTimer = setTimeout(() => {
    refreshTokens(tokens.accessToken).catch(() => {
      /* a failure surfaces on the next request */
    });
  }, inMs);
}

/**
 * Get a fresh token pair. `staleAccess` is the access token the caller found wanting (expired,
 * expiring, or refused with 401); when storage already holds a different, healthy one (another
 * call or tab refreshed meanwhile) that one is returned without spending the refresh token again.
 */
export function refreshTokens(staleAccess) {
  if (!refreshing) {
    const run = () => doRefresh(staleAccess);
    const locked =
      typeof navigator !== "undefined" && navigator.locks && navigator.locks.request
        ? navigator.locks.request(LOCK_NAME, run)
        : run();
    refreshing = locked.finally(() => {
      refreshing = null;
    });
  }
  return refreshing;
}

async function doRefresh(staleAccess) {
  const current = loadTokens();
  if (!current) throw new SessionEnded();
  if (current.accessToken !== staleAccess && current.expiresAt - Date.now() > EARLY_MS / 2) {
    scheduleRefresh(current);
    return current; // someone else refreshed already
  }
  let response;
  try {
    response = await fetch("/api/auth/refresh", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ refreshToken: current.refreshToken }),
    });
  } catch (cause) {
    throw new NetworkError(cause);
  }
  if (response.ok) {
    const saved = saveTokens(await response.json());
    // Keep the lock a moment: Chromium hands localStorage writes to other tabs' processes
    // asynchronously, and a tab that took the lock at once could still read the spent pair.
    await new Promise((resolve) => setTimeout(resolve, 150));
    return saved;
  }
  const body = await response.json().catch(() => null);
  if (response.status === 401 || response.status === 400) {
    // Without Web Locks another tab may have rotated the pair under us: use its result.
    const again = loadTokens();
    if (again && again.refreshToken !== current.refreshToken) return again;
    clearTokens();
    sessionEndedHandler();
    throw new SessionEnded();
  }
  throw new ApiError(response.status, body, response.headers);
}

async function validTokens() {
  const tokens = loadTokens();
  if (!tokens) {
    sessionEndedHandler();
    throw new SessionEnded();
  }
  if (tokens.expiresAt - Date.now() < EARLY_MS / 2) return refreshTokens(tokens.accessToken);
  return tokens;
}

// ---- requests ----------------------------------------------------------------------------------

const sleep = (ms, signal) =>
  new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    if (signal) {
      signal.addEventListener(
        "abort",
        () => {
          clearTimeout(timer);
          reject(signal.reason || new DOMException("Aborted", "AbortError"));
        },
        { once: true },
      );
    }
  });

export function backoff(attempt) {
  const base = Math.min(15_000, 500 * 2 ** attempt);
  return Math.round(base * (0.8 + Math.random() * 0.4));
}

/**
 * Send one request with the Bearer header; on 401 refresh once and send again.
 * Returns the raw Response for 2xx, throws ApiError / NetworkError / SessionEnded otherwise.
 */
export async function send(method, path, { body, headers = {}, signal, auth = true } = {}) {
  const attempt = async (tokens) => {
    const h = { ...headers };
    if (body !== undefined) h["Content-Type"] = "application/json";
    if (tokens) h.Authorization = `Bearer ${tokens.accessToken}`;
    try {
      return await fetch(path, {
        method,
        headers: h,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal,
        cache: "no-store",
      });
    } catch (cause) {
      if (signal && signal.aborted) throw cause;
      throw new NetworkError(cause);
    }
  };
  let tokens = auth ? await validTokens() : null;
  let response = await attempt(tokens);
  if (auth && response.status === 401) {
    tokens = await refreshTokens(tokens.accessToken);
    response = await attempt(tokens);
    if (response.status === 401) {
      clearTokens();
      sessionEndedHandler();
      throw new SessionEnded();
    }
  }
  if (!response.ok) {
    const errBody = await response.json().catch(() => null);
    throw new ApiError(response.status, errBody, response.headers);
  }
  return response;
}

/**
 * JSON request. `retry: true` (for safe, idempotent calls) retries network failures and 503s with
 * backoff, reporting "retrying" to the connection listeners until it gets through.
 */
export async function request(method, path, options = {}) {
  const { retry = method === "GET", signal } = options;
  for (let n = 0; ; n++) {
    try {
      const response = await send(method, path, options);
      if (n > 0) reportConnection({ state: "ok" });
      if (response.status === 204) return null;
      const text = await response.text();
      return text ? JSON.parse(text) : null;
    } catch (error) {
      const transient =
        error instanceof NetworkError || (error instanceof ApiError && error.status === 503);
      if (!retry || !transient || (signal && signal.aborted)) throw error;
      const delayMs = error.retryAfter ? error.retryAfter * 1000 : backoff(n);
      reportConnection({ state: "retrying", delayMs, attempt: n + 1 });
      await waitToRetry(delayMs, signal);
    }
  }
}

/** Wait `ms`, or less when the browser says it is back online (no need to wait out the backoff). */
export async function waitToRetry(ms, signal) {
  const done = new AbortController();
  try {
    await Promise.race([
      sleep(ms, signal),
      new Promise((resolve) => window.addEventListener("online", resolve, { once: true, signal: done.signal })),
    ]);
  } finally {
    done.abort();
  }
}

export { sleep };

// ---- the routes ----------------------------------------------------------------------------------

const enc = encodeURIComponent;

export const api = {
  async register(email, password) {
    const r = await send("POST", "/api/auth/register", { body: { email, password }, auth: false });
    return saveTokens(await r.json());
  },
  async login(email, password) {
    const r = await send("POST", "/api/auth/login", { body: { email, password }, auth: false });
    return saveTokens(await r.json());
  },
  async logout() {
    const tokens = loadTokens();
    try {
      // With the Bearer header (refreshed on a 401): the server revokes this refresh token's family.
      if (tokens) await send("POST", "/api/auth/logout", { body: { refreshToken: tokens.refreshToken } });
    } catch {
      /* signing out locally is what matters */
    } finally {
      clearTokens();
    }
  },
  me: () => request("GET", "/api/auth/me"),
  models: () => request("GET", "/api/models"),
  listChats: (cursor, limit = 30) =>
    request("GET", `/api/chats?limit=${limit}${cursor ? `&cursor=${enc(cursor)}` : ""}`),
  createChat: () => request("POST", "/api/chats", { body: {} }),
  getChat: (id) => request("GET", `/api/chats/${enc(id)}`),
  renameChat: (id, title) => request("PATCH", `/api/chats/${enc(id)}`, { body: { title } }),
  // The chat then shows the newest leaf under that message (the server's choice: see the README).
  switchBranch: (id, messageId) => request("PATCH", `/api/chats/${enc(id)}`, { body: { activeLeafId: messageId } }),
  deleteChat: (id) => request("DELETE", `/api/chats/${enc(id)}`),
  listMessages: (id, cursor, limit = 100) =>
    request("GET", `/api/chats/${enc(id)}/messages?limit=${limit}${cursor ? `&cursor=${enc(cursor)}` : ""}`),
  createGeneration: (chatId, body) =>
    request("POST", `/api/chats/${enc(chatId)}/generations`, { body }),
  getGeneration: (id) => request("GET", `/api/generations/${enc(id)}`),
  cancelGeneration: (id) => request("POST", `/api/generations/${enc(id)}/cancel`, { retry: true }),
  usage: () => request("GET", "/api/usage"),
};

export function startSession() {
  scheduleRefresh(loadTokens());
}

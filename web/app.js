// MiniChat web client: the UI. Plain ES modules, no build step.

import {
  ApiError,
  NetworkError,
  SessionEnded,
  api,
  isTokensKey,
  loadTokens,
  onConnection,
  onSessionEnded,
  startSession,
} from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { GenerationStream } from "./stream.js";
import { formatTokens, usageChart } from "./usage.js";

const $ = (id) => document.getElementById(id);
const INFLIGHT_KEY = "minichat.inflight"; // {generationId, chatId, userId}: the running answer, for reloads and tabs
const CHATS_CHANGED_KEY = "minichat.chats-changed"; // pokes other tabs to refresh their chat list
const MODEL_KEY = "minichat.model";
const SETTINGS_KEY = "minichat.settings";
const CHAT_PAGE = 30;
const IN_FLIGHT = new Set(["queued", "streaming"]);

const state = {
  user: null,
  chats: [],
  chatsCursor: null,
  chatsDone: false,
  chatsLoading: null,
  currentChatId: null,
  currentChat: null,
  messages: [],
  openSeq: 0,
  live: null, // {generationId, chatId, text, status, error, usage, stopping, stream, el}
  sending: false,
  editing: null, // {id, text}: the user message being edited in place
  models: [],
  model: localStorage.getItem(MODEL_KEY) || "",
  settings: readSettings(),
  drafts: new Map(),
  view: "chat",
  rateLimitedUntil: 0,
  usageTimer: 0,
  booted: false,
};

// ---- small helpers ----------------------------------------------------------------------------

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v === true) node.setAttribute(k, "");
    else node.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

// Constant icon markup only (never user data).
const ICONS = {
  edit: '<path d="M4 20h4L19 9l-4-4L4 16z"/><path d="M13.5 6.5l4 4"/>',
  trash: '<path d="M4 7h16M10 11v6M14 11v6M6 7l1 12a2 2 0 0 0 2 2h6a2 2 0 0 0 2-2l1-12M9 7V4h6v3"/>',
  spark: '<path d="M12 3l1.9 5.1L19 10l-5.1 1.9L12 17l-1.9-5.1L5 10l5.1-1.9z"/>',
  copy: '<rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V6a2 2 0 0 1 2-2h9"/>',
  check: '<path d="M5 12.5l4.5 4.5L19 7.5"/>',
  regenerate: '<path d="M20 12a8 8 0 1 1-2.34-5.66"/><path d="M20 4v5h-5"/>',
  prev: '<path d="M14.5 6l-6 6 6 6"/>',
  next: '<path d="M9.5 6l6 6-6 6"/>',
};
function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  svg.innerHTML = ICONS[name];
  return svg;
}

function readSettings() {
  try {
    const s = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
    return {
      systemPrompt: typeof s.systemPrompt === "string" ? s.systemPrompt : "",
      temperature: typeof s.temperature === "number" ? s.temperature : null,
    };
  } catch {
    return { systemPrompt: "", temperature: null };
  }
}

function chatTitle(chat) {
  return (chat && chat.title) || "New chat";
}

function humanError(error) {
  if (error instanceof NetworkError) return "Can't reach MiniChat right now. Check your connection and try again.";
  if (error instanceof SessionEnded) return error.message;
  if (!(error instanceof ApiError)) return "Something unexpected went wrong. Please try again.";
  const wait = error.retryAfter != null ? error.retryAfter : null;
  switch (error.code) {
    case "rate_limited":
      return wait != null ? `You're going a bit fast. Try again in ${wait} s.` : "You're going a bit fast. Try again shortly.";
    case "quota_exceeded":
      return "You've used today's token budget. It resets at midnight UTC.";
    case "invalid_credentials":
      return "That email and password don't match. Check them and try again.";
    case "email_taken":
      return "An account with this email already exists. Sign in instead.";
    case "unknown_model":
      return "That model isn't available. Pick another one from the list.";
    case "payload_too_large":
      return "That message is too long to send.";
    case "not_found":
      return "That chat doesn't exist any more.";
    case "generation_in_flight":
      return "An answer is still being written. Wait for it or stop it first.";
    case "provider_error":
      return "The model ran into a problem and couldn't finish. Try again.";
    case "provider_timeout":
      return "The model took too long to answer. Try again.";
    case "worker_lost":
    case "stream_not_opened":
      return "The answer was interrupted. Try again.";
    case "service_unavailable":
      return "MiniChat is having trouble right now. Try again in a moment.";
    case "validation_error":
      return error.message;
    default:
      return error.status >= 500
        ? `Something went wrong on our side. Try again.${error.requestId ? ` (ref ${error.requestId})` : ""}`
        : error.message;
  }
}

// ---- toasts, banner, notice ----------------------------------------------------------------

function toast(message, kind = "info", ms = 5000) {
  const node = h("div", { class: `toast toast-${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  $("toasts").append(node);
  setTimeout(() => node.classList.add("toast-out"), ms);
  setTimeout(() => node.remove(), ms + 400);
}

let bannerTimer = 0;
function showBanner(text, kind = "warn") {
  const banner = $("banner");
  banner.textContent = text;
  banner.className = `banner banner-${kind}`;
  banner.hidden = false;
}
function hideBanner() {
  clearInterval(bannerTimer);
  $("banner").hidden = true;
}

onConnection(({ state: s, delayMs }) => {
  clearInterval(bannerTimer);
  if (s === "retrying") {
    let left = Math.ceil(delayMs / 1000);
    const render = () =>
      showBanner(navigator.onLine === false ? "You're offline. Retrying when the connection is back…" : `Connection lost. Retrying${left > 1 ? ` in ${left} s` : ""}…`);
    render();
    bannerTimer = setInterval(() => {
      left -= 1;
      render();
    }, 1000);
  } else if (!$("banner").hidden) {
    hideBanner();
    toast("Back online.", "ok", 2500);
  }
});
window.addEventListener("offline", () => showBanner("You're offline. Retrying when the connection is back…"));
window.addEventListener("online", async () => {
  if ($("banner").hidden) return;
  showBanner("Reconnecting…");
  // Streams and retries resume on their own; this only tells the person when the server answers again.
  for (let n = 0; n < 8 && !$("banner").hidden; n++) {
    try {
      const r = await fetch("/api/health", { cache: "no-store" });
      if (r.status < 500 || r.status === 503) {
        hideBanner();
        toast("Back online.", "ok", 2500);
        return;
      }
    } catch {
      /* still down */
    }
    await new Promise((resolve) => setTimeout(resolve, 1000 * (n + 1)));
  }
});

let noticeTimer = 0;
function showNotice(text, kind = "error") {
  clearInterval(noticeTimer);
  const notice = $("notice");
  notice.textContent = text;
  notice.className = `notice notice-${kind}`;
  notice.hidden = false;
}
function hideNotice() {
  clearInterval(noticeTimer);
  $("notice").hidden = true;
}

function showRateLimit(seconds) {
  const secs = Math.max(1, seconds ?? 5);
  state.rateLimitedUntil = Date.now() + secs * 1000;
  const render = () => {
    const left = Math.ceil((state.rateLimitedUntil - Date.now()) / 1000);
    if (left <= 0) {
      hideNotice();
      updateComposer();
      return false;
    }
    $("notice").textContent = `You're going a bit fast. Try again in ${left} s.`;
    return true;
  };
  showNotice("", "warn");
  render();
  updateComposer();
  noticeTimer = setInterval(() => {
    if (!render()) clearInterval(noticeTimer);
  }, 500);
}

// ---- in-flight record (shared by reloads and tabs) ------------------------------------------------

function getInflight() {
  try {
    const rec = JSON.parse(localStorage.getItem(INFLIGHT_KEY) || "null");
    if (rec && state.user && rec.userId && rec.userId !== state.user.id) return null;
    return rec;
  } catch {
    return null;
  }
}
function setInflight(generationId, chatId) {
  localStorage.setItem(
    INFLIGHT_KEY,
    JSON.stringify({ generationId, chatId, userId: state.user && state.user.id, at: Date.now() }),
  );
}
function clearInflight(generationId) {
  const rec = getInflight();
  if (rec && rec.generationId === generationId) localStorage.removeItem(INFLIGHT_KEY);
}
function announceChatsChanged(action, chatId) {
  localStorage.setItem(CHATS_CHANGED_KEY, JSON.stringify({ action, chatId, at: Date.now(), r: Math.random() }));
}

// ---- auth view -------------------------------------------------------------------------------------

let authMode = "login";
function setAuthMode(mode) {
  authMode = mode;
  for (const tab of document.querySelectorAll(".tab")) tab.setAttribute("aria-selected", String(tab.dataset.mode === mode));
  $("auth-submit").textContent = mode === "login" ? "Sign in" : "Create account";
  $("auth-lead").textContent = mode === "login" ? "Welcome back. Sign in to continue." : "Create an account to start chatting.";
  $("auth-password").autocomplete = mode === "login" ? "current-password" : "new-password";
  $("password-hint").hidden = mode === "login";
  $("auth-error").hidden = true;
}

function showAuth(message) {
  stopLive();
  stopUsagePolling();
  state.user = null;
  state.booted = false;
  $("app").hidden = true;
  $("auth-view").hidden = false;
  $("auth-error").textContent = message || "";
  $("auth-error").hidden = !message;
  setTimeout(() => $("auth-email").focus(), 0);
}

async function submitAuth(event) {
  event.preventDefault();
  const email = $("auth-email").value.trim();
  const password = $("auth-password").value;
  const error = $("auth-error");
  error.hidden = true;
  if (!email || !email.includes("@")) {
    error.textContent = "Enter your email address.";
    error.hidden = false;
    return;
  }
  if (password.length < 8) {
    error.textContent = "The password needs at least 8 characters.";
    error.hidden = false;
    return;
  }
  $("auth-submit").disabled = true;
  try {
    const auth = authMode === "login" ? await api.login(email, password) : await api.register(email, password);
    $("auth-password").value = "";
    await enterApp(auth.user);
  } catch (e) {
    error.textContent = humanError(e);
    error.hidden = false;
  } finally {
    $("auth-submit").disabled = false;
  }
}

// ---- boot -------------------------------------------------------------------------------------------

async function enterApp(user) {
  state.user = user;
  state.booted = true;
  $("auth-view").hidden = true;
  $("app").hidden = false;
  $("account-email").textContent = user.email;
  $("avatar").textContent = (user.email || "?").slice(0, 1).toUpperCase();
  startSession();
  renderSettingsDot();
  loadModels();
  resetChats();
  await route();
}

async function boot() {
  onSessionEnded(() => {
    if (state.booted) showAuth("Your session has ended. Please sign in again.");
  });
  const tokens = loadTokens();
  if (!tokens) {
    showAuth();
    return;
  }
  try {
    // The stored user is enough to draw the app at once; /me confirms the session (refreshing it).
    const user = tokens.user || (await api.me());
    await enterApp(user);
    api.me().catch(() => {});
  } catch (e) {
    if (e instanceof SessionEnded) showAuth();
    else showAuth(humanError(e));
  }
}

// ---- models and settings ------------------------------------------------------------------------------

// What the picker calls each provider of GET /api/models (an unknown one shows as it is).
const PROVIDER_NAMES = { bedrock: "Amazon Bedrock", openai: "OpenAI-compatible", mock: "Built-in test models" };

function tokens(n) {
  return n >= 1000 ? `${Math.round(n / 1000)}k` : String(n);
}

// The models grouped by provider, in the server's order: the group's label names the provider, each
// option's tooltip its limits.
function modelOptions(items) {
  const groups = new Map();
  for (const m of items) {
    if (!groups.has(m.provider)) groups.set(m.provider, []);
    const title = m.contextTokens ? `${PROVIDER_NAMES[m.provider] || m.provider} · ${tokens(m.contextTokens)} context, ${tokens(m.maxOutputTokens)} max answer` : undefined;
    groups.get(m.provider).push(h("option", { value: m.id, text: m.id, title, dataset: { provider: m.provider } }));
  }
  return [...groups].map(([provider, options]) =>
    h("optgroup", { label: PROVIDER_NAMES[provider] || provider, dataset: { provider } }, options));
}

async function loadModels() {
  try {
    const { items } = await api.models();
    state.models = items;
    const select = $("model-select");
    select.replaceChildren(...modelOptions(items));
    if (!items.some((m) => m.id === state.model)) state.model = items[0] ? items[0].id : "";
    select.value = state.model;
  } catch (e) {
    if (!(e instanceof SessionEnded)) toast(`Couldn't load the models. ${humanError(e)}`, "error");
  }
}

function renderSettingsDot() {
  $("settings-dot").hidden = !(state.settings.systemPrompt.trim() || state.settings.temperature !== null);
}

let draftTemperature = null;
function renderTemperature() {
  $("temperature-value").textContent = draftTemperature === null ? "Model default" : draftTemperature.toFixed(1);
  $("temperature").value = String(draftTemperature === null ? 1 : draftTemperature);
  $("temperature").classList.toggle("is-default", draftTemperature === null);
}

function openSettings() {
  $("system-prompt").value = state.settings.systemPrompt;
  draftTemperature = state.settings.temperature;
  renderTemperature();
  $("settings-dialog").showModal();
}

function saveSettings() {
  state.settings = { systemPrompt: $("system-prompt").value, temperature: draftTemperature };
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
  renderSettingsDot();
  toast("Settings saved. They apply to your next message.", "ok", 2500);
}

// ---- chat list ------------------------------------------------------------------------------------------

function resetChats() {
  state.chats = [];
  state.chatsCursor = null;
  state.chatsDone = false;
  state.chatsLoading = null;
  renderChatList();
  loadMoreChats();
}

function loadMoreChats() {
  if (state.chatsDone) return Promise.resolve();
  if (state.chatsLoading) return state.chatsLoading;
  const cursor = state.chatsCursor;
  $("chat-list-status").textContent = state.chats.length ? "Loading…" : "";
  state.chatsLoading = api
    .listChats(cursor, CHAT_PAGE)
    .then((page) => {
      if (cursor !== state.chatsCursor) return; // a reset happened meanwhile
      const known = new Set(state.chats.map((c) => c.id));
      state.chats.push(...page.items.filter((c) => !known.has(c.id)));
      state.chatsCursor = page.nextCursor;
      state.chatsDone = !page.nextCursor;
      renderChatList();
    })
    .catch((e) => {
      if (!(e instanceof SessionEnded)) $("chat-list-status").textContent = "Couldn't load chats.";
    })
    .finally(() => {
      state.chatsLoading = null;
      if (!state.chatsDone) requestAnimationFrame(maybeLoadMoreChats);
    });
  return state.chatsLoading;
}

function maybeLoadMoreChats() {
  const scroller = $("chat-scroll");
  const sentinel = $("chat-sentinel");
  if (state.chatsDone || state.chatsLoading || $("app").hidden) return;
  const rs = scroller.getBoundingClientRect();
  const ss = sentinel.getBoundingClientRect();
  if (ss.top - rs.bottom < 300) loadMoreChats();
}

function dayBucket(iso) {
  const then = new Date(iso);
  const now = new Date();
  const startToday = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
  const t = then.getTime();
  if (t >= startToday) return "Today";
  if (t >= startToday - 86_400_000) return "Yesterday";
  if (t >= startToday - 7 * 86_400_000) return "Previous 7 days";
  if (t >= startToday - 30 * 86_400_000) return "Previous 30 days";
  return "Older";
}

function renderChatList() {
  const list = $("chat-list");
  const items = [];
  let bucket = null;
  for (const chat of state.chats) {
    const b = dayBucket(chat.updatedAt);
    if (b !== bucket) {
      bucket = b;
      items.push(h("li", { class: "chat-group", role: "presentation" }, b));
    }
    items.push(chatItem(chat));
  }
  list.replaceChildren(...items);
  $("chat-list-status").textContent =
    state.chatsDone && !state.chats.length ? "No chats yet. Start one with “New chat”." : state.chatsDone ? "" : "";
}

function chatItem(chat) {
  const active = chat.id === state.currentChatId;
  const li = h("li", { class: `chat-item${active ? " active" : ""}`, dataset: { id: chat.id } });
  const link = h(
    "a",
    { class: "chat-link", href: `#/c/${chat.id}`, "aria-current": active ? "page" : undefined, title: chatTitle(chat) },
    h("span", { class: "chat-title", text: chatTitle(chat) }),
  );
  const actions = h(
    "div",
    { class: "chat-actions" },
    h("button", { type: "button", class: "icon-btn sm", "aria-label": "Rename chat", title: "Rename", onclick: () => startRename(li, chat) }, icon("edit")),
    h("button", { type: "button", class: "icon-btn sm", "aria-label": "Delete chat", title: "Delete", onclick: () => confirmDelete(chat) }, icon("trash")),
  );
  li.append(link, actions);
  return li;
}

function startRename(li, chat) {
  const input = h("input", { class: "rename-input", value: chat.title || "", maxlength: 200, "aria-label": "Chat title" });
  li.classList.add("renaming");
  li.querySelector(".chat-link").replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== chat.title) {
      try {
        const updated = await api.renameChat(chat.id, title);
        upsertChat(updated, { moveToTop: false });
        announceChatsChanged("renamed", chat.id);
      } catch (e) {
        toast(`Couldn't rename the chat. ${humanError(e)}`, "error");
      }
    }
    renderChatList();
    renderHeading();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      finish(true);
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

function confirmDelete(chat) {
  const dialog = $("confirm-dialog");
  $("confirm-text").textContent = `“${chatTitle(chat)}” and all its messages will be deleted. This can't be undone.`;
  dialog.returnValue = "";
  dialog.showModal();
  dialog.addEventListener(
    "close",
    async () => {
      if (dialog.returnValue !== "ok") return;
      try {
        await api.deleteChat(chat.id);
      } catch (e) {
        if (!(e instanceof ApiError && e.status === 404)) {
          toast(`Couldn't delete the chat. ${humanError(e)}`, "error");
          return;
        }
      }
      removeChat(chat.id);
      announceChatsChanged("deleted", chat.id);
      toast("Chat deleted.", "ok", 2500);
    },
    { once: true },
  );
}

function removeChat(chatId) {
  state.chats = state.chats.filter((c) => c.id !== chatId);
  renderChatList();
  if (state.live && state.live.chatId === chatId) stopLive();
  const rec = getInflight();
  if (rec && rec.chatId === chatId) localStorage.removeItem(INFLIGHT_KEY);
  if (state.currentChatId === chatId) {
    state.currentChatId = null;
    location.hash = "#/";
  }
}

function upsertChat(chat, { moveToTop = true } = {}) {
  const index = state.chats.findIndex((c) => c.id === chat.id);
  if (index >= 0) state.chats.splice(index, 1, { ...state.chats[index], ...chat });
  if (moveToTop || index < 0) {
    const merged = index >= 0 ? state.chats.splice(index, 1)[0] : chat;
    state.chats.unshift(merged);
  }
  if (chat.id === state.currentChatId) state.currentChat = { ...(state.currentChat || {}), ...chat };
  renderChatList();
  renderHeading();
}

/** A chat named by its first message: fetch the name, unless it got one meanwhile (a rename wins). */
function fetchTitle(chatId) {
  const known = state.chats.find((c) => c.id === chatId);
  if (known && known.title) return;
  api
    .getChat(chatId)
    .then((chat) => {
      const current = state.chats.find((c) => c.id === chatId);
      if (current && current.title) return;
      upsertChat(current ? { ...current, title: chat.title } : chat, { moveToTop: !current });
    })
    .catch(() => {});
}

function touchChat(chatId) {
  const chat = state.chats.find((c) => c.id === chatId);
  if (chat) upsertChat({ ...chat, updatedAt: new Date().toISOString() });
}

// ---- routing ----------------------------------------------------------------------------------------------

async function route() {
  closeSidebar();
  const hash = location.hash || "#/";
  const m = /^#\/c\/([0-9a-fA-F-]{36})$/.exec(hash);
  if (hash === "#/usage") {
    showUsage();
    return;
  }
  stopUsagePolling();
  showChatView();
  if (m) await openChat(m[1].toLowerCase());
  else newChat();
}

function showChatView() {
  state.view = "chat";
  $("topbar-tools").hidden = false;
  $("usage-view").hidden = true;
  $("thread").hidden = false;
  $("composer").hidden = false;
  $("usage-link").classList.remove("active");
}

function saveDraft() {
  const text = $("input").value;
  const key = state.currentChatId || "new";
  if (text.trim()) state.drafts.set(key, text);
  else state.drafts.delete(key);
}

function loadDraft() {
  $("input").value = state.drafts.get(state.currentChatId || "new") || "";
  autosize();
  updateComposer();
}

function newChat() {
  if (state.currentChatId === null && !state.live && !state.messages.length) {
    renderHeading();
    renderMessages();
    renderChatList();
    if (matchMedia("(hover: hover)").matches) $("input").focus();
    return;
  }
  saveDraft();
  stopLive();
  state.openSeq += 1;
  $("thread").removeAttribute("aria-busy");
  state.currentChatId = null;
  state.currentChat = null;
  state.messages = [];
  renderHeading();
  renderMessages();
  renderChatList();
  loadDraft();
  hideNotice();
  if (matchMedia("(hover: hover)").matches) $("input").focus();
}

async function fetchAllMessages(chatId) {
  const all = [];
  let cursor = null;
  do {
    const page = await api.listMessages(chatId, cursor, 100);
    all.push(...page.items);
    cursor = page.nextCursor;
  } while (cursor);
  return all;
}

async function openChat(chatId, { force = false } = {}) {
  if (!force && state.currentChatId === chatId && state.view === "chat") return;
  saveDraft();
  stopLive();
  const seq = ++state.openSeq;
  state.currentChatId = chatId;
  state.currentChat = state.chats.find((c) => c.id === chatId) || null;
  state.messages = [];
  state.editing = null;
  renderHeading();
  renderChatList();
  renderMessages({ loading: true });
  loadDraft();
  hideNotice();
  $("thread").setAttribute("aria-busy", "true"); // until the history is shown and a running answer attached
  try {
    const [chat, messages] = await Promise.all([api.getChat(chatId), fetchAllMessages(chatId)]);
    if (seq !== state.openSeq) return;
    state.currentChat = chat;
    state.messages = messages;
    renderHeading();
    renderMessages();
    scrollToBottom(true);
    await attachIfRunning(chatId, seq);
  } catch (e) {
    if (seq !== state.openSeq || e instanceof SessionEnded) return;
    if (e instanceof ApiError && e.status === 404) {
      toast("That chat doesn't exist any more.", "error");
      state.chats = state.chats.filter((c) => c.id !== chatId);
      state.currentChatId = null;
      location.hash = "#/";
    } else {
      renderMessages({ error: humanError(e) });
    }
  } finally {
    if (seq === state.openSeq) $("thread").removeAttribute("aria-busy");
  }
}

/** Reload the open chat's messages: the branch it shows (another tab wrote to it, an answer finished, the
 * user switched branches). `anchor`: keep that message in view instead of scrolling to the bottom. */
async function refreshMessages({ anchor = null } = {}) {
  const chatId = state.currentChatId;
  if (!chatId) return;
  const seq = state.openSeq;
  const messages = await fetchAllMessages(chatId);
  if (seq !== state.openSeq || chatId !== state.currentChatId) return;
  state.messages = keepEndings(messages, state.messages);
  renderMessages();
  const node = anchor && $("messages").querySelector(`[data-message-id="${CSS.escape(anchor)}"]`);
  if (node) node.scrollIntoView({ block: "nearest" });
  else scrollToBottom(true);
}

/** What only this tab knows survives a reload of the list: how its answers ended ("Stopped", an error),
 * and an answer that ended with no text at all (nothing was stored) after the message it answered. */
function keepEndings(messages, shown) {
  const ended = new Map(shown.filter((m) => m.status).map((m) => [m.generationId, m]));
  const merged = messages.map((m) => {
    const e = m.role === "assistant" && ended.get(m.generationId);
    return e ? { ...m, status: e.status, errorText: e.errorText } : m;
  });
  const last = shown[shown.length - 1];
  const end = merged[merged.length - 1];
  if (last && last.status && !last.content && end && end.role === "user") merged.push(last);
  return merged;
}

/** If the open chat has a running answer (this tab's earlier life, another tab), follow it. */
async function attachIfRunning(chatId, seq = state.openSeq) {
  const rec = getInflight();
  if (!rec || rec.chatId !== chatId) return;
  if (state.live && state.live.generationId === rec.generationId) return;
  let generation;
  try {
    generation = await api.getGeneration(rec.generationId);
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) clearInflight(rec.generationId);
    return;
  }
  if (seq !== state.openSeq || state.currentChatId !== chatId) return;
  if (IN_FLIGHT.has(generation.status)) {
    follow(generation.id, chatId, { model: generation.model });
  } else {
    clearInflight(generation.id);
    if (!state.messages.some((m) => m.generationId === generation.id && m.role === "assistant")) {
      await refreshMessages();
    }
  }
}

// ---- messages -------------------------------------------------------------------------------------------

function renderHeading() {
  const title = state.view === "usage" ? "Usage" : state.currentChatId ? chatTitle(state.currentChat) : "New chat";
  $("chat-heading").textContent = title;
  document.title = state.currentChatId && state.view === "chat" ? `${title} · MiniChat` : "MiniChat";
}

function messageNode(message) {
  const role = message.role === "user" ? "user" : "assistant";
  const content = h("div", { class: "msg-content" });
  if (role === "user") content.textContent = message.content;
  else content.append(renderMarkdown(message.content));
  const body = h("div", { class: "msg-body" }, content);
  const node = h(
    "article",
    {
      class: `msg msg-${role}${message.pending ? " pending" : ""}`,
      dataset: { role, messageId: message.id || "", generationId: message.generationId || "" },
    },
    role === "assistant" ? h("div", { class: "msg-avatar", "aria-hidden": "true" }, icon("spark")) : null,
    body,
  );
  if (role === "assistant" && !message.live) {
    const bar = h("div", { class: "msg-actions" });
    bar.append(...branchSwitch(message));
    if (message.status && message.status !== "succeeded") bar.append(statusTag(message.status, message.errorText));
    if (message.content) bar.append(copyButton(message.content));
    const last = message === state.messages[state.messages.length - 1];
    if (last && (stored(message) || (message.status && !message.content))) {
      bar.append(actionButton("regenerate", "Regenerate answer", "Regenerate", () => regenerate(message)));
    }
    if (bar.childElementCount) body.append(bar);
  } else if (role === "user" && stored(message)) {
    if (state.editing && state.editing.id === message.id) {
      content.replaceWith(editBox(message));
      node.classList.add("editing");
    } else {
      const bar = h("div", { class: "msg-actions" }, ...branchSwitch(message));
      bar.append(actionButton("edit", "Edit message", "Edit", () => startEdit(message)));
      body.append(bar);
      node.classList.add("has-actions");
    }
  }
  return node;
}

// ---- branches: regenerate, edit and resend, switch ---------------------------------------------------

/** A message the server has (not one shown ahead of the reply, or an answer only this tab saw end). */
function stored(message) {
  return !!message.id && Array.isArray(message.siblingIds);
}

function branchesLocked() {
  return state.sending || busyHere();
}

function actionButton(name, label, title, onclick) {
  return h(
    "button",
    { type: "button", class: `icon-btn sm msg-action action-${name}`, "aria-label": label, title, disabled: branchesLocked(), onclick },
    icon(name),
  );
}

/** "‹ 2 / 3 ›" when the message has siblings (regenerated answers, edited messages). */
function branchSwitch(message) {
  const siblings = stored(message) ? message.siblingIds : [];
  if (siblings.length < 2) return [];
  const at = siblings.indexOf(message.id);
  const locked = branchesLocked();
  const go = (i) => () => switchBranch(siblings[i]);
  return [
    h(
      "div",
      { class: "branch-switch", role: "group", "aria-label": "Versions" },
      h("button", { type: "button", class: "icon-btn sm branch-prev", "aria-label": "Previous version", disabled: locked || at <= 0, onclick: go(at - 1) }, icon("prev")),
      h("span", { class: "branch-count", "aria-live": "polite" }, `${at + 1} / ${siblings.length}`),
      h("button", { type: "button", class: "icon-btn sm branch-next", "aria-label": "Next version", disabled: locked || at >= siblings.length - 1, onclick: go(at + 1) }, icon("next")),
    ),
  ];
}

/** Show another version: the server moves the chat to the newest leaf under it (kept across reloads). */
async function switchBranch(messageId) {
  if (branchesLocked()) return;
  const chatId = state.currentChatId;
  const seq = state.openSeq;
  state.editing = null;
  try {
    const chat = await api.switchBranch(chatId, messageId);
    if (seq !== state.openSeq) return;
    state.currentChat = chat;
    await refreshMessages({ anchor: messageId });
  } catch (e) {
    if (!(e instanceof SessionEnded)) toast(`Couldn't show that version. ${humanError(e)}`, "error");
  }
}

/** A new answer to the same prompt: the shown one makes room (it stays a version to switch back to). An
 * answer that ended with nothing stored is simply asked again. */
function regenerate(message) {
  const at = state.messages.indexOf(message);
  const body = stored(message) ? { regenerateOf: message.id } : {};
  createFromBranch(state.messages.slice(0, at), generationBody(body), null);
}

function startEdit(message) {
  if (branchesLocked()) return;
  state.editing = { id: message.id, text: message.content };
  renderMessages();
  const box = $("messages").querySelector(".edit-input");
  if (box) {
    box.focus();
    box.setSelectionRange(box.value.length, box.value.length);
  }
}

function editBox(message) {
  const input = h("textarea", { class: "edit-input", rows: 1, maxlength: 32000, "aria-label": "Edit message" });
  input.value = state.editing.text;
  const cancel = () => {
    state.editing = null;
    renderMessages();
  };
  const send = () => {
    const content = input.value;
    if (!content.trim() || branchesLocked()) return;
    state.editing = null;
    const at = state.messages.indexOf(message);
    const pending = { id: "pending", role: "user", content, pending: true };
    createFromBranch([...state.messages.slice(0, at), pending], generationBody({ content, editOf: message.id }), pending);
  };
  const fit = () => {
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 320)}px`;
  };
  input.addEventListener("input", () => {
    state.editing.text = input.value;
    fit();
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    } else if (e.key === "Escape") {
      e.preventDefault();
      e.stopPropagation();
      cancel();
    }
  });
  requestAnimationFrame(fit);
  return h(
    "div",
    { class: "edit-box" },
    input,
    h(
      "div",
      { class: "edit-buttons" },
      h("button", { type: "button", class: "btn edit-cancel", onclick: cancel }, "Cancel"),
      h("button", { type: "button", class: "btn btn-primary edit-send", onclick: send }, "Send"),
    ),
  );
}

/** Show `shown` (the branch as it will be), create the generation, follow it; put the list back if the
 * create fails. */
async function createFromBranch(shown, body, pending) {
  if (branchesLocked() || Date.now() < state.rateLimitedUntil) return;
  const chatId = state.currentChatId;
  const before = state.messages;
  state.sending = true;
  hideNotice();
  state.messages = shown;
  renderMessages();
  scrollToBottom(true);
  updateComposer();
  try {
    const reply = await api.createGeneration(chatId, body);
    if (pending) {
      pending.pending = false;
      pending.id = `sent-${reply.generationId}`;
    }
    state.sending = false;
    startFollowing(reply, chatId, body);
  } catch (e) {
    state.messages = before;
    if (state.currentChatId === chatId) renderMessages();
    createFailed(e, chatId, body.content || "");
  } finally {
    state.sending = false;
    updateComposer();
  }
}

function copyButton(text) {
  const button = h("button", { type: "button", class: "icon-btn sm copy-btn", "aria-label": "Copy answer", title: "Copy" }, icon("copy"));
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(text);
      button.replaceChildren(icon("check"));
      button.classList.add("copied");
      setTimeout(() => {
        button.replaceChildren(icon("copy"));
        button.classList.remove("copied");
      }, 1500);
    } catch {
      toast("Couldn't copy. Select the text and copy it instead.", "error");
    }
  });
  return button;
}

function statusTag(status, errorText) {
  if (status === "canceled") return h("div", { class: "msg-status status-stopped", dataset: { status } }, "Stopped");
  if (status === "failed") return h("div", { class: "msg-status status-failed", dataset: { status } }, errorText || "The answer failed.");
  return h("div", { class: "msg-status", dataset: { status } }, status);
}

function renderMessages({ loading = false, error = null } = {}) {
  const container = $("messages");
  const nodes = [];
  if (loading) {
    nodes.push(h("div", { class: "loading", role: "status" }, h("span", { class: "spinner" }), "Loading conversation…"));
  } else if (error) {
    nodes.push(h("div", { class: "load-error", role: "alert" }, error, " ", h("button", { type: "button", class: "link-btn", onclick: () => openChat(state.currentChatId, { force: true }), text: "Retry" })));
  }
  for (const message of state.messages) nodes.push(messageNode(message));
  const live = state.live;
  const persisted = live && state.messages.some((m) => m.role === "assistant" && m.generationId === live.generationId);
  if (live && live.chatId === state.currentChatId && !persisted) {
    live.el = liveNode(live);
    nodes.push(live.el);
  } else if (live) {
    live.el = null; // not shown here (another chat open, or its final message is already listed)
  }
  container.replaceChildren(...nodes);
  $("empty").hidden = loading || !!error || nodes.length > 0;
  $("thread").classList.toggle("is-empty", !$("empty").hidden);
}

function liveNode(live) {
  const node = messageNode({ role: "assistant", content: live.text, generationId: live.generationId, live: true });
  node.classList.add("streaming");
  node.setAttribute("aria-busy", "true");
  const content = node.querySelector(".msg-content");
  if (!live.text) content.append(h("span", { class: "typing", "aria-label": "Thinking" }, h("i"), h("i"), h("i")));
  return node;
}

let liveFrame = 0;
function scheduleLiveRender() {
  if (liveFrame) return;
  const flush = () => {
    if (!liveFrame) return;
    liveFrame = 0;
    renderLive();
  };
  liveFrame = requestAnimationFrame(flush);
  setTimeout(flush, 120); // rAF is paused in background tabs: the text still arrives
}

function renderLive() {
  const live = state.live;
  if (!live || !live.el || live.chatId !== state.currentChatId) return;
  const stick = nearBottom();
  const content = live.el.querySelector(".msg-content");
  if (live.text) content.replaceChildren(renderMarkdown(live.text));
  else content.replaceChildren(h("span", { class: "typing", "aria-label": "Thinking" }, h("i"), h("i"), h("i")));
  if (stick) scrollToBottom();
}

function nearBottom() {
  const t = $("thread");
  return t.scrollHeight - t.scrollTop - t.clientHeight < 120;
}
function scrollToBottom(force = false) {
  const t = $("thread");
  if (force || nearBottom()) t.scrollTop = t.scrollHeight;
}

// ---- following a generation -------------------------------------------------------------------------

function follow(generationId, chatId, { streamUrl = null, model = null } = {}) {
  if (state.live && state.live.generationId === generationId) return;
  stopLive();
  const live = { generationId, chatId, text: "", status: "streaming", error: null, usage: null, stopping: false, model, el: null };
  state.live = live;
  live.stream = new GenerationStream(generationId, {
    streamUrl,
    onReset: () => {
      live.text = "";
      scheduleLiveRender();
    },
    onEvent: (event) => {
      if (state.live !== live) return;
      if (event.type === "delta") {
        live.text += event.delta;
        scheduleLiveRender();
      } else if (event.type === "usage") {
        live.usage = event;
      } else if (event.type === "error") {
        live.error = event;
      } else if (event.type === "done") {
        live.status = event.status;
        finishLive(live);
      }
    },
    onState: (s) => {
      if (state.live !== live) return;
      if (s === "live" && !$("banner").hidden) hideBanner();
      if (s === "gone") {
        clearInflight(generationId);
        stopLive();
        if (state.currentChatId === chatId) refreshMessages().catch(() => {});
      }
    },
  });
  renderMessages();
  scrollToBottom(true);
  updateComposer();
}

function finishLive(live) {
  clearInflight(live.generationId);
  if (state.live === live) state.live = null;
  if (live.chatId === state.currentChatId) {
    const already = state.messages.some((m) => m.role === "assistant" && m.generationId === live.generationId);
    if (!already && (live.text || live.status !== "succeeded")) {
      state.messages.push({
        id: `live-${live.generationId}`,
        chatId: live.chatId,
        role: "assistant",
        content: live.text,
        generationId: live.generationId,
        status: live.status,
        errorText: live.error ? humanError(new ApiError(500, { error: { code: live.error.code, message: live.error.message } })) : null,
        createdAt: new Date().toISOString(),
      });
    }
    const stick = nearBottom();
    renderMessages();
    if (stick) scrollToBottom(true);
  }
  touchChat(live.chatId);
  updateComposer();
  if (live.stopping && live.status === "canceled") toast("Stopped. The partial answer is kept.", "info", 2500);
  // The stored messages' ids and versions (siblingIds), for Edit, Regenerate and the switcher.
  if (live.chatId === state.currentChatId) refreshMessages().catch(() => {});
}

function stopLive() {
  if (!state.live) return;
  state.live.stream.close(); // only stops listening: the generation goes on on the server
  state.live = null;
  updateComposer();
}

async function stopGeneration() {
  const live = state.live;
  if (!live || live.stopping) return;
  live.stopping = true;
  updateComposer();
  try {
    await api.cancelGeneration(live.generationId);
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) {
      live.stopping = false;
      toast(`Couldn't stop the answer. ${humanError(e)}`, "error");
      updateComposer();
    }
  }
}

// ---- composer ---------------------------------------------------------------------------------------

function busyHere() {
  return !!(state.live && state.live.chatId === state.currentChatId);
}

function updateComposer() {
  const busy = busyHere();
  const limited = Date.now() < state.rateLimitedUntil;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("stop").disabled = !!(busy && state.live.stopping);
  $("stop").classList.toggle("stopping", !!(busy && state.live.stopping));
  $("send").disabled = state.sending || limited || !$("input").value.trim();
  $("composer").classList.toggle("busy", busy);
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, Math.round(window.innerHeight * 0.4))}px`;
}

async function sendMessage() {
  const input = $("input");
  const content = input.value;
  if (!content.trim() || state.sending || busyHere()) return;
  if (Date.now() < state.rateLimitedUntil) return;
  state.sending = true;
  hideNotice();
  // Show the message at once; it is taken back (and the text restored) if sending fails.
  let chatId = state.currentChatId;
  const pending = { id: "pending", role: "user", content, pending: true };
  state.messages.push(pending);
  state.drafts.delete(chatId || "new");
  input.value = "";
  autosize();
  renderMessages();
  scrollToBottom(true);
  updateComposer();
  try {
    if (!chatId) {
      const chat = await api.createChat();
      chatId = chat.id;
      state.openSeq += 1;
      state.currentChatId = chatId;
      state.currentChat = chat;
      upsertChat(chat);
      history.replaceState(null, "", `#/c/${chatId}`);
      announceChatsChanged("created", chatId);
    }
    const body = generationBody({ content });
    const reply = await api.createGeneration(chatId, body);
    pending.pending = false;
    pending.id = `sent-${reply.generationId}`;
    state.sending = false;
    startFollowing(reply, chatId, body);
    if (!state.currentChat || !state.currentChat.title) fetchTitle(chatId);
  } catch (e) {
    state.messages = state.messages.filter((m) => m !== pending);
    if (state.currentChatId === chatId || !chatId) {
      renderMessages();
      if (!input.value.trim()) {
        input.value = content;
        autosize();
      }
    }
    await createFailed(e, chatId, content);
  } finally {
    state.sending = false;
    updateComposer();
  }
}

/** A create's body: `fields` plus the chosen model and the settings. */
function generationBody(fields) {
  const body = { ...fields, model: state.model || undefined };
  if (state.settings.systemPrompt.trim()) body.systemPrompt = state.settings.systemPrompt;
  if (state.settings.temperature !== null) body.temperature = state.settings.temperature;
  return body;
}

function startFollowing(reply, chatId, body) {
  setInflight(reply.generationId, chatId);
  if (state.currentChatId === chatId) follow(reply.generationId, chatId, { streamUrl: reply.streamUrl, model: body.model });
  touchChat(chatId);
}

async function createFailed(e, chatId, content) {
  if (e instanceof ApiError && e.code === "generation_in_flight") await attachAfterConflict(e.generationId, chatId, content);
  else if (e instanceof ApiError && e.code === "rate_limited") showRateLimit(e.retryAfter);
  else if (!(e instanceof SessionEnded)) showNotice(humanError(e));
}

/** POST answered 409 generation_in_flight: show the running answer instead of failing. */
async function attachAfterConflict(generationId, fromChatId, content) {
  if (!generationId) {
    showNotice("An answer is still being written. Wait for it or stop it first.", "warn");
    return;
  }
  let generation;
  try {
    generation = await api.getGeneration(generationId);
  } catch (e) {
    showNotice(humanError(e));
    return;
  }
  if (!IN_FLIGHT.has(generation.status)) {
    showNotice("The previous answer just finished. Send your message again.", "info");
    if (generation.chatId === state.currentChatId) refreshMessages().catch(() => {});
    return;
  }
  setInflight(generation.id, generation.chatId);
  if (generation.chatId === state.currentChatId) {
    showNotice("An answer is still being written here. Your message is kept: send it when it's done, or stop it.", "info");
    await refreshMessages().catch(() => {});
    follow(generation.id, generation.chatId, { model: generation.model });
  } else {
    // The composer still holds the message: leaving this chat keeps it as the chat's draft.
    if (!$("input").value.trim()) $("input").value = content;
    toast("Another answer is still being written, so here it is. Your message is kept as a draft in the other chat.", "info", 6000);
    location.hash = `#/c/${generation.chatId}`;
  }
}

// ---- usage view -----------------------------------------------------------------------------------------

let lastUsage = null;
function showUsage() {
  saveDraft();
  stopLive();
  state.openSeq += 1;
  state.view = "usage";
  state.currentChatId = null;
  state.currentChat = null;
  renderChatList();
  renderHeading();
  $("thread").hidden = true;
  $("composer").hidden = true;
  $("topbar-tools").hidden = true;
  $("usage-view").hidden = false;
  $("usage-link").classList.add("active");
  refreshUsage();
  stopUsagePolling();
  state.usageTimer = setInterval(() => {
    if (document.visibilityState === "visible") refreshUsage();
  }, 4000);
}

function stopUsagePolling() {
  clearInterval(state.usageTimer);
  state.usageTimer = 0;
}

async function refreshUsage() {
  try {
    const usage = await api.usage();
    if (state.view !== "usage") return;
    lastUsage = usage;
    drawUsage();
  } catch (e) {
    if (!(e instanceof SessionEnded) && !lastUsage) $("usage-chart").replaceChildren(h("p", { class: "load-error" }, humanError(e)));
  }
}

function drawUsage() {
  if (!lastUsage) return;
  const { totals } = lastUsage;
  $("usage-input").textContent = formatTokens(totals.inputTokens);
  $("usage-output").textContent = formatTokens(totals.outputTokens);
  $("usage-total").textContent = formatTokens(totals.inputTokens + totals.outputTokens);
  const card = $("usage-chart");
  const width = card.clientWidth - 32;
  card.replaceChildren(usageChart(lastUsage, width > 0 ? width : 640));
}

// ---- sidebar (narrow screens) ----------------------------------------------------------------------------

function openSidebar() {
  document.body.classList.add("sidebar-open");
  $("scrim").hidden = false;
}
function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  $("scrim").hidden = true;
}

// ---- wiring ---------------------------------------------------------------------------------------------

function wire() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => setAuthMode(tab.dataset.mode));
  $("auth-form").addEventListener("submit", submitAuth);

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    sendMessage();
  });
  const input = $("input");
  input.addEventListener("input", () => {
    autosize();
    updateComposer();
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage();
    }
  });
  $("stop").addEventListener("click", stopGeneration);
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || e.defaultPrevented) return;
    if (document.querySelector("dialog[open]")) return; // the dialog closes itself
    if (document.body.classList.contains("sidebar-open")) {
      closeSidebar();
      return;
    }
    if (busyHere()) {
      e.preventDefault();
      stopGeneration();
    }
  });

  $("new-chat").addEventListener("click", () => {
    if (location.hash === "#/" || location.hash === "") route();
    else location.hash = "#/";
  });
  $("logout").addEventListener("click", async () => {
    stopLive();
    state.booted = false; // signing out on purpose: no "session ended" message
    localStorage.removeItem(INFLIGHT_KEY);
    state.drafts.clear();
    await api.logout();
    history.replaceState(null, "", "#/");
    showAuth();
  });
  $("open-sidebar").addEventListener("click", openSidebar);
  $("close-sidebar").addEventListener("click", closeSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  $("chat-list").addEventListener("click", (e) => {
    if (e.target.closest(".chat-link")) closeSidebar();
  });
  $("chat-scroll").addEventListener("scroll", maybeLoadMoreChats, { passive: true });
  new IntersectionObserver((entries) => {
    if (entries.some((en) => en.isIntersecting)) loadMoreChats();
  }, { root: $("chat-scroll"), rootMargin: "0px 0px 300px 0px" }).observe($("chat-sentinel"));

  $("model-select").addEventListener("change", (e) => {
    state.model = e.target.value;
    localStorage.setItem(MODEL_KEY, state.model);
  });
  $("open-settings").addEventListener("click", openSettings);
  $("settings-cancel").addEventListener("click", () => $("settings-dialog").close("cancel"));
  $("settings-form").addEventListener("submit", (e) => {
    if (e.submitter && e.submitter.value === "save") saveSettings();
  });
  $("temperature").addEventListener("input", (e) => {
    draftTemperature = Number(e.target.value);
    renderTemperature();
  });
  $("temperature-reset").addEventListener("click", () => {
    draftTemperature = null;
    renderTemperature();
  });

  window.addEventListener("hashchange", () => {
    if (state.booted) route();
  });
  window.addEventListener("resize", () => {
    if (state.view === "usage") drawUsage();
    autosize();
  });

  // Other tabs: sign-out, a new answer in the chat shown here, chat list changes.
  window.addEventListener("storage", (e) => {
    if (isTokensKey(e.key)) {
      if (!e.newValue && state.booted) showAuth("You signed out in another tab.");
      else if (e.newValue && !state.booted) boot();
      else if (e.newValue && state.user) {
        let next = null;
        try {
          next = JSON.parse(e.newValue);
        } catch {
          return;
        }
        if (next && next.user && next.user.id !== state.user.id) location.reload(); // another account now
      }
      return;
    }
    if (!state.booted) return;
    if (e.key === INFLIGHT_KEY && e.newValue) {
      let rec = null;
      try {
        rec = JSON.parse(e.newValue);
      } catch {
        return;
      }
      if (rec.userId && state.user && rec.userId !== state.user.id) return;
      touchChat(rec.chatId);
      fetchTitle(rec.chatId);
      if (rec.chatId === state.currentChatId && state.view === "chat" && !(state.live && state.live.generationId === rec.generationId)) {
        const seq = state.openSeq;
        refreshMessages()
          .then(() => attachIfRunning(rec.chatId, seq))
          .catch(() => {});
      }
    } else if (e.key === CHATS_CHANGED_KEY && e.newValue) {
      let change = null;
      try {
        change = JSON.parse(e.newValue);
      } catch {
        return;
      }
      if (change.action === "deleted") removeChat(change.chatId);
      else if (change.action === "renamed" || change.action === "created") {
        api.getChat(change.chatId).then((chat) => upsertChat(chat, { moveToTop: change.action === "created" })).catch(() => {});
      }
    }
  });
}

wire();
boot();

// For the browser tests and curious developers (the tokens are not in here).
window.minichat = { state };

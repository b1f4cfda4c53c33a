// The review loop: log in, claim the next item, draw it with its proposed boxes, submit a
// verdict or skip it.
//
// Leases stay short and visible: a claim holds an item for LEASE_S seconds, shown in the
// header; it is renewed only while this tab is visible and the reviewer did something within
// the last minute, and it is given back when the page is closed. So an item is never held by
// a reviewer who walked away for longer than LEASE_S.
"use strict";

const LEASE_S = 120;
const RENEW_WHEN_LEFT_S = 30;
const ACTIVE_WITHIN_MS = 60 * 1000;
const SKIP_MEMORY_MS = 15 * 60 * 1000; // a skipped item is passed over this long
const LIST_LIMIT = 200;

const $ = (id) => document.getElementById(id);
const state = {
  session: null, // {auth, reviewer, csrf_token, ...} from /v1/session; auth false: no keys
  item: null,
  token: null,
  leaseEndsAt: 0, // Date.now() ms; counted from when the claim was sent (no clock skew)
  renewal: null, // the lease renewal in flight, if any: a verdict waits for its new token
  lastActivity: Date.now(),
  labelled: 0,
  labelSets: {},
  skipped: new Map(), // item id -> Date.now() when skipped
  onlySkippedLeft: false,
};

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

function setState(name) {
  document.body.dataset.state = name;
}

function headersFor(method) {
  const headers = { "content-type": "application/json" };
  if (method !== "GET" && state.session && state.session.csrf_token) {
    headers[state.session.csrf_header || "x-csrf-token"] = state.session.csrf_token;
  }
  return headers;
}

async function api(path, options = {}) {
  const method = (options.method || "GET").toUpperCase();
  const response = await fetch(path, { ...options, headers: headersFor(method), credentials: "same-origin" });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.reason || response.statusText);
    error.status = response.status;
    error.field = body.field;
    if (response.status === 401 && !path.startsWith("/v1/session")) {
      showLogin(`Please log in again: ${error.message}`);
    }
    throw error;
  }
  return body;
}

// -- login --------------------------------------------------------------------------------

function reviewerName() {
  if (state.session && state.session.auth) return state.session.reviewer;
  return $("reviewer").value.trim();
}

function showLogin(text = "") {
  state.session = null;
  state.item = null;
  state.token = null;
  $("main").hidden = true;
  $("start").hidden = true;
  $("logout").hidden = true;
  $("who").textContent = "";
  $("lease").textContent = "";
  $("login").hidden = false;
  $("login-message").textContent = text;
  setState("login");
  $("key").focus();
}

function startSession(session) {
  state.session = session;
  const keyed = Boolean(session.auth);
  $("reviewer-box").hidden = keyed;
  $("logout").hidden = !keyed;
  $("who").textContent = keyed ? `${session.reviewer} · tenant ${session.tenant} · ${session.role}` : "";
  if (!keyed) $("reviewer").value = localStorage.getItem("visionroute.reviewer") || "";
  loadSkips();
  $("login").hidden = true;
  $("main").hidden = false;
  $("start").hidden = false;
  setState("idle");
  say(keyed ? `Logged in as ${session.reviewer}. Press n for the first item.` : "Press n for the first item.");
  refreshQueue();
}

async function login(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) { $("login-message").textContent = "Paste your API key."; return; }
  $("login-button").disabled = true;
  try {
    const session = await api("/v1/session/login", { method: "POST", body: JSON.stringify({ key }) });
    $("key").value = "";
    startSession(session);
  } catch (error) {
    $("login-message").textContent = `Not logged in (${error.status}): ${error.message}`;
    setState("login");
  } finally {
    $("login-button").disabled = false;
  }
}

async function logout() {
  await giveBack();
  await api("/v1/session/logout", { method: "POST" }).catch(() => {});
  showLogin("Logged out.");
}

// -- skipped items (per tab, per reviewer) --------------------------------------------------

function skipsKey() {
  return `visionroute.skipped.${reviewerName()}`;
}

function loadSkips() {
  try {
    state.skipped = new Map(JSON.parse(sessionStorage.getItem(skipsKey()) || "[]"));
  } catch (error) {
    state.skipped = new Map();
  }
  forgetOldSkips();
}

function forgetOldSkips() {
  const now = Date.now();
  for (const [id, at] of state.skipped) if (now - at > SKIP_MEMORY_MS) state.skipped.delete(id);
  sessionStorage.setItem(skipsKey(), JSON.stringify([...state.skipped]));
}

// -- the queue -----------------------------------------------------------------------------

function setEnabled(enabled) {
  for (const id of ["confirm", "reject", "skip", "correct", "label"]) $(id).disabled = !enabled;
  if (!enabled) setState("busy"); // a request is in flight; keys wait
}

async function refreshQueue() {
  try {
    const stats = await api("/v1/review/stats");
    $("queue").textContent = `queue: ${stats.depth} pending, ${stats.overdue} overdue`;
  } catch (error) { /* the header count is informative only */ }
}

async function labelsFor(task) {
  if (!(task in state.labelSets)) {
    const body = await api(`/v1/review/labels/${encodeURIComponent(task)}`);
    state.labelSets[task] = body.labels || [];
    $("labels").replaceChildren(...state.labelSets[task].map((name) => new Option(name)));
  }
  return state.labelSets[task];
}

function drawItem(item, image) {
  const canvas = $("canvas");
  const scale = Math.min(1, 900 / image.naturalWidth, 600 / image.naturalHeight) || 1;
  canvas.width = Math.round(image.naturalWidth * scale);
  canvas.height = Math.round(image.naturalHeight * scale);
  const ctx = canvas.getContext("2d");
  ctx.drawImage(image, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 2;
  ctx.font = "bold 14px system-ui, sans-serif";
  const whole = (b) => b.xyxy[0] <= 0 && b.xyxy[1] <= 0 && b.xyxy[2] >= image.naturalWidth && b.xyxy[3] >= image.naturalHeight;
  // A classifier's answer is whole-image rows: label the image with the top one only.
  const boxes = item.proposed.length && item.proposed.every(whole) ? item.proposed.slice(0, 1) : item.proposed;
  boxes.forEach((box, i) => {
    const [x1, y1, x2, y2] = box.xyxy.map((v) => v * scale);
    ctx.strokeStyle = i === 0 ? "#ffcc00" : "#00b7ff";
    ctx.strokeRect(x1 + 1, y1 + 1, x2 - x1 - 2, y2 - y1 - 2);
    const text = `${box.label ?? "?"} ${(box.confidence * 100).toFixed(0)}%`;
    const width = ctx.measureText(text).width + 8;
    ctx.fillStyle = "rgba(0,0,0,.7)";
    ctx.fillRect(x1 + 2, y1 + 2, width, 20);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x1 + 6, y1 + 17);
  });
  canvas.dataset.boxes = String(boxes.length);
}

function showItem(item) {
  $("empty").hidden = true;
  $("canvas").hidden = false;
  $("meta").replaceChildren(`${item.task} · tenant ${item.tenant} · ${item.kind} · age ${Math.round(item.age_s)} s`);
  if (item.is_overdue) $("meta").insertAdjacentHTML("beforeend", ' <span class="overdue">past SLA</span>');
  $("reason").textContent = item.reason;
  $("proposals").replaceChildren(...item.proposed.slice(0, 5).map((p) => {
    const li = document.createElement("li");
    li.textContent = `${p.label ?? "?"} (${(p.confidence * 100).toFixed(1)}%)`;
    return li;
  }));
  $("steps").replaceChildren(...(item.trace.steps || []).map((s) => {
    const li = document.createElement("li");
    li.textContent = `${s.stage}${s.decision ? " → " + s.decision : ""}${s.reason ? ": " + s.reason : ""}`;
    return li;
  }));
  $("label").value = "";
  // Shortcuts act on the page, not on the label box a correction left focused.
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
}

function showNothing(text, name) {
  state.item = null;
  state.token = null;
  $("canvas").hidden = true;
  $("empty").hidden = false;
  $("empty").textContent = text;
  $("lease").textContent = "";
  setState(name);
  say(text);
}

function claimBody(extra = {}) {
  return JSON.stringify({ reviewer: reviewerName(), lease_s: LEASE_S, ...extra });
}

// The next item, passing over the ones this reviewer skipped lately: the queue's own order
// (overdue, most valuable, oldest) when nothing is skipped; otherwise the first unleased,
// unskipped item of the same order, claimed by id (another reviewer may win it: try the next).
async function claimPassingOverSkipped() {
  forgetOldSkips();
  if (state.skipped.size === 0) return api("/v1/review/claim", { method: "POST", body: claimBody() });
  const listing = await api(`/v1/review/items?status=pending&limit=${LIST_LIMIT}`);
  let skippedWaiting = 0;
  for (const item of listing.items) {
    if (state.skipped.has(item.id)) { skippedWaiting += 1; continue; }
    if (item.is_leased && item.lease_owner !== reviewerName()) continue;
    try {
      return await api("/v1/review/claim", { method: "POST", body: claimBody({ item_id: item.id }) });
    } catch (error) {
      if (error.status !== 409 && error.status !== 404) throw error; // taken or gone: the next one
    }
  }
  return { item: null, lease_token: null, skippedWaiting };
}

async function claimNext() {
  if (state.item && document.body.dataset.state === "item") {
    say("Label or skip (s) this item first.", true);
    return;
  }
  const reviewer = reviewerName();
  if (!reviewer) { say("Enter your name first.", true); $("reviewer").focus(); return; }
  if (!(state.session && state.session.auth)) localStorage.setItem("visionroute.reviewer", reviewer);
  if (state.onlySkippedLeft) { state.skipped.clear(); forgetOldSkips(); state.onlySkippedLeft = false; }
  setEnabled(false);
  try {
    const sentAt = Date.now();
    const claimed = await claimPassingOverSkipped();
    if (!claimed.item) {
      if (claimed.skippedWaiting) {
        state.onlySkippedLeft = true;
        showNothing(`Only the ${claimed.skippedWaiting} item(s) you skipped are left. Press n to see them again.`, "skipped-only");
      } else {
        showNothing("Nothing to review.", "empty");
      }
      await refreshQueue();
      return;
    }
    state.item = claimed.item;
    state.token = claimed.lease_token;
    state.leaseEndsAt = sentAt + LEASE_S * 1000;
    const image = new Image();
    const loaded = new Promise((resolve, reject) => { image.onload = resolve; image.onerror = reject; });
    image.src = `/v1/review/items/${state.item.id}/image`;
    await Promise.all([loaded, labelsFor(state.item.task)]);
    showItem(state.item);
    drawItem(state.item, image);
    setEnabled(true);
    setState("item");
    document.body.dataset.item = state.item.id;
    tick();
    say(`Item ${state.item.id.slice(0, 8)}: c confirm · x correct · r reject · s skip.`);
  } catch (error) {
    if (error.status === 401) return; // the login form is up
    await giveBack(); // claimed but not shown (its image failed): hold nothing unseen
    setState("error");
    say(`Could not claim: ${error.message}`, true);
  }
  await refreshQueue();
}

async function submit(verdict, label = null) {
  if (!state.item) return;
  setEnabled(false);
  if (state.renewal) await state.renewal; // label under the newest lease token
  const body = { reviewer: reviewerName(), lease_token: state.token, verdict };
  if (label !== null) body.label = label;
  try {
    await api(`/v1/review/items/${state.item.id}/label`, { method: "POST", body: JSON.stringify(body) });
    state.labelled += 1;
    $("done").textContent = `labelled: ${state.labelled}`;
    document.body.dataset.labelled = String(state.labelled);
    state.item = null;
    await claimNext(); // the reviewer is at work: the next item, on a short, visible lease
  } catch (error) {
    if (error.status === 401) return;
    say(`Not saved (${error.status}): ${error.message}`, true);
    // An expired or stolen lease cannot be saved: take the next item instead.
    if (error.status === 409) { state.item = null; await claimNext(); } else { setEnabled(true); setState("item"); }
  }
}

async function skip() {
  if (!state.item) return;
  const item = state.item;
  setEnabled(false);
  if (state.renewal) await state.renewal; // release under the newest lease token
  try {
    await api(`/v1/review/items/${item.id}/release`, {
      method: "POST",
      body: JSON.stringify({ reviewer: reviewerName(), lease_token: state.token }),
    });
  } catch (error) {
    if (error.status === 401) return;
    if (error.status !== 409) { say(`Not skipped (${error.status}): ${error.message}`, true); setEnabled(true); setState("item"); return; }
    // 409: the lease had already run out; the item is back in the queue either way
  }
  state.skipped.set(item.id, Date.now());
  forgetOldSkips();
  document.body.dataset.skipped = String(Number(document.body.dataset.skipped || 0) + 1);
  state.item = null;
  state.token = null;
  await claimNext();
}

// Give the held item back (logout, closing the page); best effort.
async function giveBack(keepalive = false) {
  if (!state.item || !state.token) return;
  const item = state.item;
  const body = JSON.stringify({ reviewer: reviewerName(), lease_token: state.token });
  state.item = null;
  state.token = null;
  await fetch(`/v1/review/items/${item.id}/release`, {
    method: "POST", body, keepalive, headers: headersFor("POST"), credentials: "same-origin",
  }).catch(() => {});
}

function renew() {
  const item = state.item;
  const sentAt = Date.now();
  state.renewal = api("/v1/review/claim", { method: "POST", body: claimBody({ item_id: item.id }) })
    .then((claimed) => {
      if (state.item !== item) return;
      state.token = claimed.lease_token;
      state.leaseEndsAt = sentAt + LEASE_S * 1000;
    })
    .catch(() => { /* tick() shows the lease running out */ })
    .finally(() => { state.renewal = null; });
}

function tick() {
  if (!state.item || document.body.dataset.state !== "item") return;
  const left = (state.leaseEndsAt - Date.now()) / 1000;
  const active = document.visibilityState === "visible" && Date.now() - state.lastActivity < ACTIVE_WITHIN_MS;
  if (left > 0 && left <= RENEW_WHEN_LEFT_S && active && !state.renewal) renew();
  if (left > 0) {
    $("lease").textContent = `yours for ${Math.ceil(left)} s`;
    $("lease").className = left <= RENEW_WHEN_LEFT_S ? "low" : "muted";
    return;
  }
  state.item = null;
  state.token = null;
  for (const id of ["confirm", "reject", "skip", "correct", "label"]) $(id).disabled = true;
  $("lease").textContent = "lease ran out";
  setState("expired");
  say("This item went back to the queue while you were away. Press n for the next one.", true);
}

function correct(event) {
  event.preventDefault();
  const label = $("label").value.trim();
  const known = state.labelSets[state.item?.task] || [];
  if (!label) { say("Type the right label.", true); return; }
  if (known.length && !known.includes(label)) { say(`"${label}" is not in this task's label set.`, true); return; }
  submit("correct", label);
}

document.addEventListener("keydown", (event) => {
  state.lastActivity = Date.now();
  if (event.target.tagName === "INPUT") {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey || !state.session) return;
  const key = event.key.toLowerCase();
  if (key === "n") { event.preventDefault(); claimNext(); }
  else if (!state.item || $("confirm").disabled) return;
  else if (key === "c") { event.preventDefault(); submit("confirm"); }
  else if (key === "r") { event.preventDefault(); submit("reject"); }
  else if (key === "s") { event.preventDefault(); skip(); }
  else if (key === "x") { event.preventDefault(); $("label").focus(); }
});
for (const type of ["pointerdown", "pointermove", "wheel"]) {
  document.addEventListener(type, () => { state.lastActivity = Date.now(); }, { passive: true });
}
// Leaving the page gives the held item back. beforeunload comes first, while the page is surely
// still running (a busy browser may stop a closing page before its pagehide handlers finish);
// pagehide covers the ways out that skip it. giveBack forgets the item, so it is sent once.
window.addEventListener("beforeunload", () => { giveBack(true); });
window.addEventListener("pagehide", () => { giveBack(true); });

$("login-form").addEventListener("submit", login);
$("logout").addEventListener("click", logout);
$("start").addEventListener("click", claimNext);
$("confirm").addEventListener("click", () => submit("confirm"));
$("reject").addEventListener("click", () => submit("reject"));
$("skip").addEventListener("click", skip);
$("correct-form").addEventListener("submit", correct);
setInterval(tick, 1000);

(async function boot() {
  setState("starting");
  try {
    startSession(await api("/v1/session"));
  } catch (error) {
    if (error.status === 401) showLogin();
    else { setState("error"); say(`The service did not answer: ${error.message}`, true); }
  }
})();

// The review loop: claim the next item, draw it with its proposed boxes, submit a verdict.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { item: null, token: null, labelled: 0, labelSets: {} };

function say(text, isError = false) {
  $("message").textContent = text;
  $("message").className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const response = await fetch(path, { headers: { "content-type": "application/json" }, ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.reason || response.statusText);
    error.status = response.status;
    throw error;
  }
  return body;
}

function setEnabled(enabled) {
  for (const id of ["confirm", "reject", "correct", "label"]) $(id).disabled = !enabled;
  if (!enabled) document.body.dataset.state = "busy";  // a request is in flight; keys wait
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
  const overdue = item.is_overdue ? ' <span class="overdue">past SLA</span>' : "";
  $("meta").innerHTML = "";
  $("meta").append(`${item.task} · tenant ${item.tenant} · ${item.kind} · age ${Math.round(item.age_s)} s`);
  if (overdue) $("meta").insertAdjacentHTML("beforeend", overdue);
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

async function claimNext() {
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { say("Enter your name first.", true); $("reviewer").focus(); return; }
  localStorage.setItem("visionroute.reviewer", reviewer);
  setEnabled(false);
  try {
    const claimed = await api("/v1/review/claim", { method: "POST", body: JSON.stringify({ reviewer }) });
    state.item = claimed.item;
    state.token = claimed.lease_token;
    if (!state.item) {
      $("canvas").hidden = true;
      $("empty").hidden = false;
      document.body.dataset.state = "empty";
      say("Nothing to review.");
      await refreshQueue();
      return;
    }
    const image = new Image();
    const loaded = new Promise((resolve, reject) => { image.onload = resolve; image.onerror = reject; });
    image.src = `/v1/review/items/${state.item.id}/image`;
    await Promise.all([loaded, labelsFor(state.item.task)]);
    showItem(state.item);
    drawItem(state.item, image);
    setEnabled(true);
    document.body.dataset.state = "item";
    document.body.dataset.item = state.item.id;
    say(`Item ${state.item.id.slice(0, 8)} is yours for ${Math.round(state.item.lease_expires_at - Date.now() / 1000)} s.`);
  } catch (error) {
    document.body.dataset.state = "error";
    say(`Could not claim: ${error.message}`, true);
  }
  await refreshQueue();
}

async function submit(verdict, label = null) {
  if (!state.item) return;
  const body = { reviewer: $("reviewer").value.trim(), lease_token: state.token, verdict };
  if (label !== null) body.label = label;
  setEnabled(false);
  try {
    await api(`/v1/review/items/${state.item.id}/label`, { method: "POST", body: JSON.stringify(body) });
    state.labelled += 1;
    $("done").textContent = `labelled: ${state.labelled}`;
    document.body.dataset.labelled = String(state.labelled);
    await claimNext();
  } catch (error) {
    say(`Not saved (${error.status}): ${error.message}`, true);
    // An expired or stolen lease cannot be saved: take the next item instead.
    if (error.status === 409) { await claimNext(); } else { setEnabled(true); }
  }
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
  if (event.target.tagName === "INPUT") {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (key === "n") { event.preventDefault(); claimNext(); }
  else if (!state.item || $("confirm").disabled) return;
  else if (key === "c") { event.preventDefault(); submit("confirm"); }
  else if (key === "r") { event.preventDefault(); submit("reject"); }
  else if (key === "x") { event.preventDefault(); $("label").focus(); }
});

$("start").addEventListener("click", claimNext);
$("confirm").addEventListener("click", () => submit("confirm"));
$("reject").addEventListener("click", () => submit("reject"));
$("correct-form").addEventListener("submit", correct);
$("reviewer").value = localStorage.getItem("visionroute.reviewer") || "";
document.body.dataset.state = "idle";
refreshQueue();

// The volunteer's grid: show a task, toggle tiles, verify or skip, and never lose an answer.
//
// The next task is fetched (and its tiles preloaded) while the volunteer works on the current
// one, so that after Verify the next grid appears at once. Answers go to an outbox kept in
// localStorage and are sent in the background; a network error keeps them there and retries.
// One request per grid: the answer just given goes out with the request for the task after the
// one now shown (POST .../tasks/answer); a backlog of older answers goes out without leases.

const root = document.getElementById("play");
const slug = root.dataset.project;
const gridEl = document.getElementById("grid");
const tiles = [...gridEl.querySelectorAll(".tile")];
const promptEl = document.getElementById("prompt");
const descriptionEl = document.getElementById("description");
const statusEl = document.getElementById("status");
const counterEl = document.getElementById("counter");
const verifyBtn = document.getElementById("verify");
const skipBtn = document.getElementById("skip");
const doneEl = document.getElementById("done");
const contextEl = document.getElementById("context");
const contextImg = contextEl.querySelector("img.whole");
const aroundImg = contextEl.querySelector("img.around");

// Keypad layout: 7 8 9 / 4 5 6 / 1 2 3 maps onto the grid's rows.
const KEY_TO_POSITION = { 7: 0, 8: 1, 9: 2, 4: 3, 5: 4, 6: 5, 1: 6, 2: 7, 3: 8 };
const OUTBOX_KEY = `tessera.outbox.${slug}`;
const EXPIRY_MARGIN_MS = 5000;

let current = null; // the task on screen
let nextTask = null; // a promise of the task after it
let selected = new Set();
let shownAt = 0;
let answered = 0;
let busy = false;

function say(message, kind = "info") {
  statusEl.textContent = message;
  statusEl.dataset.kind = kind;
}

function preload(url) {
  const img = new Image();
  img.src = url;
  // decode() resolves once the tile is ready to paint; a broken tile must not stall the grid.
  return img.decode().catch(() => undefined);
}

// An offer once its pictures are loaded, so that it shows at once.
async function ready(offer) {
  if (offer.task) {
    const urls = offer.task.tiles.map((t) => t.url);
    if (offer.task.context_url) urls.push(offer.task.context_url);
    if (offer.task.around_url) urls.push(offer.task.around_url);
    await Promise.all(urls.map(preload));
  }
  return offer;
}

async function fetchTask(attempt = 0) {
  try {
    const response = await fetch(`/api/projects/${slug}/tasks/next`, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`the server answered ${response.status}`);
    return await ready(await response.json());
  } catch (error) {
    const wait = Math.min(1000 * 2 ** attempt, 15000);
    say(`Cannot reach the server (${error.message}); trying again in ${wait / 1000} s.`, "error");
    await new Promise((r) => setTimeout(r, wait));
    return fetchTask(attempt + 1);
  }
}

function expired(task) {
  return Date.parse(task.expires_at) - EXPIRY_MARGIN_MS < Date.now();
}

function render(task) {
  current = task;
  selected = new Set();
  promptEl.innerHTML = "";
  promptEl.append("Select all squares with ");
  const strong = document.createElement("strong");
  strong.textContent = task.tag.display_name;
  promptEl.append(strong);
  descriptionEl.textContent = task.tag.description || "";
  // A window's nine tiles share one shape: square (projects with square cells), else the
  // cells' aspect kept within 3:4 and 4:3 (a longer tile is letterboxed, never cropped); a
  // mosaic's come from many images: square boxes.
  const first = task.tiles[0];
  const aspect = task.kind === "window" ? Math.min(4 / 3, Math.max(3 / 4, first.width / first.height)) : 1;
  root.style.setProperty("--tile-aspect", String(aspect));
  gridEl.dataset.kind = task.kind;
  contextEl.hidden = !task.context_url;
  if (task.context_url) contextImg.src = task.context_url;
  else contextImg.removeAttribute("src");
  aroundImg.hidden = !task.around_url;
  if (task.around_url) aroundImg.src = task.around_url;
  else aroundImg.removeAttribute("src");
  for (const tile of tiles) {
    const data = task.tiles[Number(tile.dataset.position)];
    tile.querySelector("img").src = data.url;
    tile.setAttribute("aria-selected", "false");
  }
  fit();
  root.dataset.taskId = String(task.id);
  shownAt = performance.now();
  window.dispatchEvent(new CustomEvent("tessera:shown", { detail: { id: task.id } }));
}

// The stylesheet sizes the grid for a usual prompt; a long tag description or the context
// pictures make the prompt taller, so the grid shrinks until Verify is on screen (never under
// MIN_GRID_PX wide: on a tiny screen the page scrolls instead).
const MIN_GRID_PX = 240;
const FOLD_MARGIN_PX = 8;
function fit() {
  root.style.maxWidth = "";
  const aspect = Number(root.style.getPropertyValue("--tile-aspect")) || 1;
  // A narrower page may wrap the prompt onto one more line: measure again (a few times at most).
  for (let i = 0; i < 4; i += 1) {
    const overflow = verifyBtn.getBoundingClientRect().bottom + FOLD_MARGIN_PX - window.innerHeight;
    const width = root.getBoundingClientRect().width;
    if (overflow <= 0 || width <= MIN_GRID_PX) return;
    // Three rows of tiles: the grid loses `overflow` px of height for overflow * aspect of width.
    root.style.maxWidth = `${Math.max(MIN_GRID_PX, Math.floor(width - overflow * aspect))}px`;
  }
}
// The context pictures take their place once loaded (even from the cache, after render).
for (const el of [window, contextImg, aroundImg]) {
  el.addEventListener(el === window ? "resize" : "load", () => {
    if (current) fit();
  });
}

async function showNext() {
  let offer = await (nextTask || fetchTask());
  nextTask = null;
  if (offer.task && expired(offer.task)) offer = await fetchTask();
  if (!offer.task) {
    current = null;
    root.classList.add("finished");
    doneEl.hidden = false;
    promptEl.textContent = offer.message || "Nothing left to ask right now.";
    return;
  }
  render(offer.task);
  // Whether the next grid is ready to show at once (its pictures loaded): for tests and benches.
  root.dataset.prefetched = "false";
  nextTask = fetchNext();
  nextTask.then(() => {
    root.dataset.prefetched = "true";
  });
}

// The task after the one shown: with the answers waiting in the outbox when there are any
// (one request), else on its own.
async function fetchNext() {
  if (outbox().length) {
    const offer = await flush(0, true);
    if (offer) return ready(offer);
  }
  return fetchTask();
}

function toggle(position) {
  if (!current || busy) return;
  const tile = tiles[position];
  if (selected.has(position)) selected.delete(position);
  else selected.add(position);
  tile.setAttribute("aria-selected", String(selected.has(position)));
}

// --- the outbox: answers survive reloads and network errors -----------------------------

function outbox() {
  try {
    return JSON.parse(localStorage.getItem(OUTBOX_KEY) || "[]");
  } catch {
    return [];
  }
}

function saveOutbox(items) {
  localStorage.setItem(OUTBOX_KEY, JSON.stringify(items));
}

// Send the outbox, oldest first. With `wantNext`, the last answer asks for the next task too,
// and that offer is returned (else null: nothing sent, refused, or a send in progress).
let flushing = false;
async function flush(attempt = 0, wantNext = false) {
  if (flushing) return null;
  flushing = true;
  let failed = false;
  let offer = null;
  try {
    // Drain: answers queued while a send is under way go out in the same run.
    for (let item = outbox()[0]; item && !failed; item = outbox()[0]) {
      // One lease per call: answers queued meanwhile (a fast volunteer) go out without one.
      const withNext = wantNext && !offer && outbox().length === 1;
      let response;
      try {
        response = await fetch(`/api/projects/${slug}/tasks/answer`, {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          credentials: "same-origin",
          body: JSON.stringify({ [item.kind]: item.body, next: withNext }),
        });
      } catch {
        failed = true;
        continue;
      }
      if (response.status >= 500) {
        failed = true;
        continue;
      }
      const sent = item.id;
      saveOutbox(outbox().filter((o) => o.id !== sent));
      const data = response.ok ? await response.json().catch(() => null) : null;
      if (withNext && data) offer = { task: data.task, message: data.message };
      if (item.kind !== "submit") continue;
      if (data) {
        const result = data.submission;
        if (result.feedback === "check_again") {
          say("Some squares did not look right. Please check each grid carefully.", "warn");
        } else if (statusEl.dataset.kind === "error") {
          say("Back online: your answers were sent.");
        } else if (result.feedback === "ok" && statusEl.dataset.kind === "warn") {
          say("Thank you: that one looked right.");
        }
      } else {
        const detail = (await response.json().catch(() => ({}))).detail || response.statusText;
        say(`One grid could not be counted: ${detail}.`, "warn");
      }
    }
  } finally {
    flushing = false;
  }
  if (failed) {
    const wait = Math.min(1000 * 2 ** attempt, 30000);
    say(`Offline? Your answers are kept on this device and will be sent (retry in ${wait / 1000} s).`, "error");
    setTimeout(() => flush(attempt + 1), wait);
  }
  return offer;
}

function queue(kind, body) {
  const items = outbox();
  items.push({ id: `${Date.now()}-${Math.random()}`, kind, body });
  saveOutbox(items);
}

// --- actions ---------------------------------------------------------------------------

async function act(kind) {
  if (!current || busy) return;
  busy = true;
  const task = current;
  try {
    if (expired(task)) {
      say("That grid expired while it was open, so it could not be counted. Here is a fresh one.", "warn");
      nextTask = null;
      await showNext();
      return;
    }
    // Kept on the device first, sent with the request for the grid after the one shown next:
    // nothing is lost, nothing waits.
    if (kind === "submit") {
      const elapsed = Math.round(performance.now() - shownAt);
      queue("submit", { token: task.token, selected: [...selected].sort(), elapsed_ms: elapsed });
      answered += 1;
      counterEl.textContent = `${answered} grid${answered === 1 ? "" : "s"} answered`;
    } else {
      queue("skip", { token: task.token });
    }
    await showNext();
  } finally {
    busy = false;
  }
}

tiles.forEach((tile, position) => {
  tile.addEventListener("click", () => toggle(position));
  tile.addEventListener("focus", () => {
    tiles.forEach((t) => t.setAttribute("tabindex", t === tile ? "0" : "-1"));
  });
});

verifyBtn.addEventListener("click", () => act("submit"));
skipBtn.addEventListener("click", () => act("skip"));

document.addEventListener("keydown", (event) => {
  if (event.altKey || event.ctrlKey || event.metaKey) return;
  const key = event.key;
  if (key in KEY_TO_POSITION) {
    event.preventDefault();
    toggle(KEY_TO_POSITION[key]);
    tiles[KEY_TO_POSITION[key]].focus();
  } else if (key === "Enter") {
    event.preventDefault();
    act("submit");
  } else if (key === "s" || key === "S") {
    event.preventDefault();
    act("skip");
  } else if (key === " " && document.activeElement?.classList.contains("tile")) {
    event.preventDefault();
    toggle(Number(document.activeElement.dataset.position));
  } else if (key.startsWith("Arrow") && document.activeElement?.classList.contains("tile")) {
    event.preventDefault();
    const p = Number(document.activeElement.dataset.position);
    const [r, c] = [Math.floor(p / 3), p % 3];
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    const [dr, dc] = moves[key];
    const nr = Math.min(2, Math.max(0, r + dr));
    const nc = Math.min(2, Math.max(0, c + dc));
    tiles[nr * 3 + nc].focus();
  }
});

window.addEventListener("online", () => flush());

flush();
showNext();

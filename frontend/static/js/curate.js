// The curator's target view: overlay switching and a brush for pixel fixes.
// The painted mask lives in an offscreen canvas at the image's own resolution (white = object);
// the visible canvas shows it in translucent red. Saving posts it as a PNG with the CSRF token.

const view = document.querySelector(".target-view");
for (const input of document.querySelectorAll('input[name="overlay"]')) {
  input.addEventListener("change", () => { view.dataset.overlay = input.value; });
}

const form = document.getElementById("paint-form");
const shown = view.querySelector("canvas.paint");
const mask = document.createElement("canvas");
mask.width = shown.width;
mask.height = shown.height;
const maskCtx = mask.getContext("2d");
const shownCtx = shown.getContext("2d");

function redraw() {
  shownCtx.clearRect(0, 0, shown.width, shown.height);
  shownCtx.globalCompositeOperation = "source-over";
  shownCtx.drawImage(mask, 0, 0);
  shownCtx.globalCompositeOperation = "source-in";  // keep the painted pixels, recoloured
  shownCtx.fillStyle = "rgba(230, 30, 60, 0.55)";
  shownCtx.fillRect(0, 0, shown.width, shown.height);
}

async function startFrom(url) {
  maskCtx.clearRect(0, 0, mask.width, mask.height);
  if (!url) return;
  const img = new Image();
  img.src = url;
  await img.decode();
  // The stored PNG is white on black: keep white as opaque paint, black as nothing.
  const tmp = document.createElement("canvas");
  tmp.width = mask.width;
  tmp.height = mask.height;
  const t = tmp.getContext("2d");
  t.drawImage(img, 0, 0, mask.width, mask.height);
  const data = t.getImageData(0, 0, mask.width, mask.height);
  for (let i = 0; i < data.data.length; i += 4) {
    const on = data.data[i] > 127;
    data.data[i] = data.data[i + 1] = data.data[i + 2] = 255;
    data.data[i + 3] = on ? 255 : 0;
  }
  maskCtx.putImageData(data, 0, 0);
}

let last = null;  // the previous point of the stroke, so that fast moves paint a line

function paintAt(event) {
  const box = shown.getBoundingClientRect();
  const x = (event.clientX - box.left) * (shown.width / box.width);
  const y = (event.clientY - box.top) * (shown.height / box.height);
  const size = Number(form.elements.size.value) * (shown.width / box.width);
  const erase = event.shiftKey || form.elements.tool.value === "erase";
  maskCtx.globalCompositeOperation = erase ? "destination-out" : "source-over";
  maskCtx.strokeStyle = maskCtx.fillStyle = "#fff";
  maskCtx.lineWidth = size;
  maskCtx.lineCap = "round";
  maskCtx.beginPath();
  if (last) {
    maskCtx.moveTo(last.x, last.y);
    maskCtx.lineTo(x, y);
    maskCtx.stroke();
  } else {
    maskCtx.arc(x, y, size / 2, 0, 2 * Math.PI);
    maskCtx.fill();
  }
  last = { x, y };
  redraw();
}

let painting = false;
shown.addEventListener("pointerdown", (e) => {
  e.preventDefault();  // no text selection while painting
  painting = true;
  last = null;
  shown.setPointerCapture(e.pointerId);
  paintAt(e);
});
shown.addEventListener("pointermove", (e) => { if (painting) paintAt(e); });
shown.addEventListener("pointerup", () => { painting = false; last = null; });

document.getElementById("paint-start").addEventListener("click", async () => {
  await startFrom(form.dataset.mask);
  shown.hidden = false;
  view.classList.add("painting");
  redraw();
  document.getElementById("paint-save").disabled = false;
  // The canvas is where the curator paints: bring it (and the tools under it) into view.
  view.scrollIntoView({ block: "start", behavior: "smooth" });
});

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  // Flatten to white object on black background, as the server reads it.
  const out = document.createElement("canvas");
  out.width = mask.width;
  out.height = mask.height;
  const o = out.getContext("2d");
  o.fillStyle = "#000";
  o.fillRect(0, 0, out.width, out.height);
  o.drawImage(mask, 0, 0);
  const blob = await new Promise((resolve) => out.toBlob(resolve, "image/png"));
  const body = new FormData();
  body.append("csrf_token", form.elements.csrf_token.value);
  body.append("mask", blob, "mask.png");
  const response = await fetch(form.action, { method: "POST", body, redirect: "follow" });
  if (response.ok) {
    window.location.assign(response.url);
  } else {
    const detail = (await response.json().catch(() => ({}))).detail || response.statusText;
    alert(`The mask was not saved: ${detail}`);
  }
});

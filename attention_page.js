"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const S = DATA.imsize, K = DATA.k, SIDE = 256, NS = "http://www.w3.org/2000/svg";
const state = {seed: 0, pixel: DATA.default_pixel, locked: false, mode: "weights"};
const cache = {};

// attention.pixel_to_cell: the cell whose pixel block holds pixel (x, y), the pixel meaning its centre
function pixelToCell(x, y, H, W, h, w) {
  return [Math.min(Math.floor((y + 0.5) * H / h), H - 1), Math.min(Math.floor((x + 0.5) * W / w), W - 1)];
}
// attention.cell_to_pixel: the centre of cell (i, j)'s pixel block, in image coordinates
function cellToPixel(i, j, H, W, h, w) { return [(j + 0.5) * w / W, (i + 0.5) * h / H]; }

// attention_page.unpack: base64 -> zlib inflate (the browser's own) -> typed array
async function unpack(text, Type) {
  const bytes = Uint8Array.from(atob(text), c => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Type(await new Response(stream).arrayBuffer());
}

async function seedData(s) {
  if (!cache[s]) {
    const src = DATA.seeds[s], out = {layers: {}};
    out.image = await new Promise(ok => { const im = new Image(); im.onload = () => ok(im); im.src = src.image; });
    for (const L of DATA.layers) {
      const d = src.layers[L.name];
      out.layers[L.name] = {
        weights: await unpack(d.weights, Uint8Array), v_norm: await unpack(d.v_norm, Float32Array),
        top: await unpack(d.top, Uint16Array), top_w: await unpack(d.top_w, Float32Array),
        ctop: await unpack(d.ctop, Uint16Array), ctop_w: await unpack(d.ctop_w, Float32Array),
        stats: await unpack(d.stats, Float32Array), csum: await unpack(d.csum, Float32Array)};
    }
    cache[s] = out;
  }
  return cache[s];
}
const distUniform = {};

// matplotlib's 'jet', piecewise linear
function jet(v) {
  const c = x => Math.round(255 * Math.max(0, Math.min(1, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

function svgEl(tag, attrs) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function cross(x, y, cell) {
  const a = S / 20, g = svgEl("g", {class: "query", "data-x": x, "data-y": y});
  if (cell) g.setAttribute("data-cell", cell.join(","));
  for (const [x1, y1, x2, y2] of [[x - a, y - a, x + a, y + a], [x - a, y + a, x + a, y - a]])
    g.appendChild(svgEl("line", {x1, y1, x2, y2, stroke: "red", "stroke-width": 2.5, "vector-effect": "non-scaling-stroke"}));
  return g;
}

function makePanel(id, title) {
  const p = document.createElement("div");
  p.className = "panel"; p.id = "panel-" + id;
  p.innerHTML = `<h3></h3><div class="view"><canvas width="${SIDE}" height="${SIDE}"></canvas>` +
    `<svg viewBox="0 0 ${S} ${S}" preserveAspectRatio="none"></svg></div><div class="stats"></div>`;
  p.querySelector("h3").textContent = title;
  const view = p.querySelector(".view");
  const pixelAt = e => {
    const r = view.getBoundingClientRect();
    const f = v => Math.max(0, Math.min(S - 1, Math.floor(v)));
    return [f((e.clientX - r.left) / r.width * S), f((e.clientY - r.top) / r.height * S)];
  };
  view.addEventListener("mousemove", e => { if (!state.locked) { state.pixel = pixelAt(e); render(); } });
  view.addEventListener("click", e => {
    state.locked = !state.locked;
    if (state.locked) state.pixel = pixelAt(e);
    render();
  });
  document.getElementById("panels").appendChild(p);
  return p;
}

let rendering = Promise.resolve();
function render() { rendering = rendering.then(draw); return rendering; }

async function draw() {
  const sd = await seedData(state.seed), [x, y] = state.pixel, mode = state.mode;
  const q = document.getElementById("query");
  q.textContent = `query pixel (${x}, ${y})` + (state.locked ? " locked" : "");
  q.className = state.locked ? "locked" : "";
  q.dataset.x = x; q.dataset.y = y; q.dataset.locked = state.locked;
  const img = document.getElementById("panel-image");
  const ictx = img.querySelector("canvas").getContext("2d");
  ictx.imageSmoothingEnabled = false;
  ictx.drawImage(sd.image, 0, 0, SIDE, SIDE);
  img.querySelector("svg").replaceChildren(cross(x + 0.5, y + 0.5, null));
  img.querySelector(".stats").textContent = `seed ${DATA.seeds[state.seed].seed}\npixel (${x}, ${y})`;
  for (const L of DATA.layers) {
    const {H, W, name} = L, N = H * W, d = sd.layers[name];
    const [i, j] = pixelToCell(x, y, H, W, S, S), n = i * W + j;
    const panel = document.getElementById("panel-" + name);
    panel.querySelector("h3").textContent = `${name} (${H}x${W}), cell (${i}, ${j})`;
    panel.dataset.cell = `${i},${j}`;
    // the map over the image, nearest (each cell's weight on its whole pixel block), alpha 0.6
    const heat = document.createElement("canvas"); heat.width = W; heat.height = H;
    const hctx = heat.getContext("2d"), px = hctx.createImageData(W, H);
    // contribution |gamma| a_qk ||v_k||: the weights times the value norms, on its own 0..max scale
    const row = Float32Array.from({length: N}, (_, m) => d.weights[n * N + m] * (mode === "weights" ? 1 : d.v_norm[m]));
    const vmax = Math.max(...row, 1e-30);
    for (let m = 0; m < N; m++) px.data.set([...jet(row[m] / vmax), 255], 4 * m);
    hctx.putImageData(px, 0, 0);
    const ctx = panel.querySelector("canvas").getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.globalAlpha = 1; ctx.drawImage(sd.image, 0, 0, SIDE, SIDE);
    ctx.globalAlpha = 0.6; ctx.drawImage(heat, 0, 0, SIDE, SIDE);
    // top-k markers: area proportional to weight, the largest dot for the row's largest weight
    const top = mode === "weights" ? d.top : d.ctop, tw = mode === "weights" ? d.top_w : d.ctop_w;
    const svg = panel.querySelector("svg"), marks = [], rmax = S / 18;
    const wmax = Math.max(tw[n * K], 1e-30);
    for (let t = 0; t < K && t < N; t++) {
      const m = top[n * K + t], [cx, cy] = cellToPixel(Math.floor(m / W), m % W, H, W, S, S);
      marks.push(svgEl("circle", {class: "topk", cx, cy, r: rmax * Math.sqrt(tw[n * K + t] / wmax),
        fill: "blue", "fill-opacity": 0.85, stroke: "white", "stroke-width": 0.6,
        "vector-effect": "non-scaling-stroke", "data-cell": `${Math.floor(m / W)},${m % W}`,
        "data-weight": tw[n * K + t]}));
    }
    const [qx, qy] = cellToPixel(i, j, H, W, S, S);
    svg.replaceChildren(...marks, cross(qx, qy, [i, j]));
    // the numbers of attention.stats_text, of the weights (the contribution's sum in that mode)
    const st = d.stats, f = (v, p) => v.toFixed(p), pc = v => (100 * v).toFixed(1) + "%";
    const g = L.gamma >= 0 ? "+" + f(L.gamma, 3) : f(L.gamma, 3);
    let text = `gamma ${g}  top-${K} ${pc(st[3 * n])} (uniform ${pc(Math.min(K, N) / N)})\n` +
      `H/logN ${f(st[3 * n + 1], 2)}  dist ${f(st[3 * n + 2], 1)}px (uniform ${f(distUniform[name][n], 1)})`;
    if (mode === "contribution") text += `\nsum ||gamma a v|| ${d.csum[n].toPrecision(3)}`;
    panel.querySelector(".stats").textContent = text;
  }
  document.body.dataset.ready = "1";
}

(async () => {
  document.getElementById("describe").textContent = DATA.describe;
  const sel = document.getElementById("seed");
  DATA.seeds.forEach((s, idx) => sel.add(new Option(`seed ${s.seed}`, idx)));
  sel.addEventListener("change", () => { state.seed = +sel.value; render(); });
  const mode = document.getElementById("mode");
  mode.addEventListener("change", () => { state.mode = mode.value; render(); });
  makePanel("image", "image");
  for (const L of DATA.layers) {
    makePanel(L.name, L.name);
    distUniform[L.name] = await unpack(L.dist_uniform, Float32Array);
  }
  render();
})();
if (DATA.film) {  // the same image and query at each saved checkpoint of the run
  const F = DATA.film.frames, slider = document.getElementById("film-step");
  const show = i => {
    document.getElementById("film-image").src = F[i].image;
    document.getElementById("film-label").textContent = `step ${F[i].step} (${i + 1} of ${F.length})`;
  };
  document.getElementById("film-title").textContent = DATA.film.title;
  slider.max = F.length - 1;
  slider.value = F.length - 1;
  slider.addEventListener("input", () => show(+slider.value));
  show(F.length - 1);
  document.getElementById("film").hidden = false;
}

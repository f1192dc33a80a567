"use strict";
// The explorer page's script. Its data (attention_page.page_data) is the JSON in #data: per seed and
// layer, every query cell's attention row (uint8, scaled to the row's max), its top-k cells and its
// numbers, precomputed; this script only looks them up and draws.
const DATA = JSON.parse(document.getElementById("data").textContent);
const S = DATA.imsize, K = DATA.k, SIDE = 256, NS = "http://www.w3.org/2000/svg";
const LUT = DATA.lut;  // attention_colors.lut(): 256 RGB colours, index 0 = no weight, 255 = the row's max
const GS = DATA.layers.filter(L => L.net === "G").map(L => L.name);
const state = {seed: 0, pixel: DATA.default_pixel, locked: false, mode: "weights",
               layer: DATA.film ? DATA.film.layer : (GS[GS.length - 1] || DATA.layers[0].name)};
const cache = {}, distUniform = {};

// What each number means, for someone who has never seen the page (hover titles).
const TITLES = {
  gamma: "gamma: the layer's learned gate. The layer adds gamma x (what attention gathered) to its " +
         "input, so 0 means attention changes nothing here; the larger |gamma|, the more it can matter.",
  weights: {
    head: "The numbers below describe the attention weights a_qk of this query: the share of its " +
          "attention the query (red cross) gives to each cell k; they sum to 1.",
    top: `top-${K}: the share of this query's attention that goes to its ${K} most attended cells ` +
         `(the blue rings). In brackets: what uniform attention would give (${K}/N). Near 100% = it ` +
         "looks at a few places; near the bracket = it looks everywhere.",
    H: "H/logN: the entropy of the attention row divided by its largest possible value. " +
       "1 = spread evenly over the whole map; 0 = all of it on one cell.",
    dist: "dist: the average distance, in image pixels, from the query to the cells it attends to, " +
          "weighted by attention. In brackets: the same for uniform attention. Much smaller = local; " +
          "about the same = long-range or everywhere.",
  },
  contribution: {
    head: "The numbers below describe the contribution ||gamma a_qk v_k||: how much each cell actually " +
          "adds to the query's output (its weight times the size of its value vector, times |gamma|), " +
          "normalised to sum 1. A heavily weighted cell with a small value adds little.",
    top: `top-${K}: the share of the contribution that comes from its ${K} largest cells (the blue ` +
         `rings). In brackets: the share for a uniform spread (${K}/N).`,
    H: "H/logN: the entropy of the contribution (normalised to sum 1) divided by its largest possible " +
       "value. 1 = every cell adds the same; 0 = one cell adds everything.",
    dist: "dist: the average distance, in image pixels, from the query to the cells that add to it, " +
          "weighted by what each adds. In brackets: the same for a uniform spread.",
    sum: "sum ||gamma a v||: the total size of what the keys add to this query (before cancellation " +
         "between them); compare with the layer's input at this position.",
    none: "gamma is 0: this layer adds nothing, so its contribution has no spread to describe.",
  },
  max: {
    weights: "The largest weight in this query's row: the top of this panel's colour scale. In brackets, " +
             "as a multiple of the uniform weight 1/N (1x = no cell is preferred).",
    contribution: "The largest contribution ||gamma a_qk v_k|| of any one cell: the top of this panel's " +
                  "colour scale.",
  },
  delta: "The mean absolute change of the image's pixel values (0..1 scale) against the original.",
};

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

function loadImage(src) {
  return new Promise(ok => { const im = new Image(); im.onload = () => ok(im); im.src = src; });
}

async function seedData(s) {
  if (!cache[s]) {
    const src = DATA.seeds[s], out = {layers: {}};
    out.image = await loadImage(src.image);
    for (const L of DATA.layers) {
      const d = src.layers[L.name];
      out.layers[L.name] = {
        weights: await unpack(d.weights, Uint8Array), v_norm: await unpack(d.v_norm, Float32Array),
        top: await unpack(d.top, Uint16Array), top_w: await unpack(d.top_w, Float32Array),
        ctop: await unpack(d.ctop, Uint16Array), ctop_w: await unpack(d.ctop_w, Float32Array),
        stats: await unpack(d.stats, Float32Array), cstats: await unpack(d.cstats, Float32Array),
        csum: await unpack(d.csum, Float32Array)};
    }
    cache[s] = out;
  }
  return cache[s];
}

function el(tag, attrs = {}, text = null) {
  const e = tag === "svg" || tag === "g" || tag === "line" || tag === "circle"
    ? document.createElementNS(NS, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== null) e.textContent = text;
  return e;
}

// a number with its plain-language meaning on hover
function stat(text, title) { return el("span", {title, class: "num"}, text); }

// the colour scale drawn from the LUT into a canvas `width` cells wide
function drawScale(canvas) {
  const ctx = canvas.getContext("2d"), px = ctx.createImageData(canvas.width, 1);
  for (let x = 0; x < canvas.width; x++)
    px.data.set([...LUT[Math.round(255 * x / (canvas.width - 1))], 255], 4 * x);
  for (let y = 0; y < canvas.height; y++) ctx.putImageData(px, 0, y);
}

function cross(x, y, cell) {
  const a = S / 20, g = el("g", {class: "query", "data-x": x, "data-y": y});
  if (cell) g.setAttribute("data-cell", cell.join(","));
  for (const [x1, y1, x2, y2] of [[x - a, y - a, x + a, y + a], [x - a, y + a, x + a, y - a]])
    g.appendChild(el("line", {x1, y1, x2, y2, stroke: "red", "stroke-width": 2.5, "vector-effect": "non-scaling-stroke"}));
  return g;
}

function role(L) {
  return L.net === "D" ? "D looking at the generated image" : "G drawing the image";
}

function makePanel(id, L) {
  const p = el("div", {class: "panel", id: "panel-" + id});
  p.innerHTML = `<h3></h3><div class="view"><canvas width="${SIDE}" height="${SIDE}"></canvas>` +
    `<svg viewBox="0 0 ${S} ${S}" preserveAspectRatio="none"></svg></div>` +
    (L ? `<div class="scale"><span>0</span><canvas width="64" height="1"></canvas><span class="max"></span></div>` : "") +
    `<div class="stats"></div>`;
  p.querySelector("h3").textContent = L ? `${L.name} (${L.H}x${L.W}): ${role(L)}` : "image";
  if (L) {
    p.querySelector("h3").title = L.net === "D"
      ? "The discriminator's attention while it judges the generated image shown on the left."
      : "The generator's attention while it draws the image.";
    drawScale(p.querySelector(".scale canvas"));
  }
  const view = p.querySelector(".view");
  const pixelAt = e => {
    const r = view.getBoundingClientRect();
    const f = v => Math.max(0, Math.min(S - 1, Math.floor(v)));
    return [f((e.clientX - r.left) / r.width * S), f((e.clientY - r.top) / r.height * S)];
  };
  const select = () => { if (L) state.layer = L.name; };
  view.addEventListener("mousemove", e => {
    if (!state.locked) { state.pixel = pixelAt(e); select(); render(); }
  });
  // a click locks the query there; a second click unlocks and the query is at once where the mouse is
  view.addEventListener("click", e => {
    state.locked = !state.locked;
    state.pixel = pixelAt(e);
    select();
    render();
  });
  document.getElementById("panels").appendChild(p);
  return p;
}

let rendering = Promise.resolve();
function render() { rendering = rendering.then(draw); return rendering; }

function drawLayer(L, sd, x, y, mode) {
  const {H, W, name} = L, N = H * W, d = sd.layers[name];
  const [i, j] = pixelToCell(x, y, H, W, S, S), n = i * W + j;
  const panel = document.getElementById("panel-" + name);
  panel.querySelector("h3").textContent = `${name} (${H}x${W}): ${role(L)}, cell (${i}, ${j})`;
  panel.dataset.cell = `${i},${j}`;
  // the map over the image, nearest (each cell's colour on its whole pixel block), alpha 0.6; the
  // colour is the value's share of the row's max (the weights are stored as round(255 * a / max))
  const heat = el("canvas", {width: W, height: H});
  const hctx = heat.getContext("2d"), px = hctx.createImageData(W, H);
  // contribution |gamma| a_qk ||v_k||: the weights times the value norms, on its own 0..max scale
  const row = Float32Array.from({length: N}, (_, m) => d.weights[n * N + m] * (mode === "weights" ? 1 : d.v_norm[m]));
  const vmax = Math.max(...row, 1e-30);
  for (let m = 0; m < N; m++) px.data.set([...LUT[Math.round(255 * row[m] / vmax)], 255], 4 * m);
  hctx.putImageData(px, 0, 0);
  const ctx = panel.querySelector(".view canvas").getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.globalAlpha = 1; ctx.drawImage(sd.image, 0, 0, SIDE, SIDE);
  ctx.globalAlpha = 0.6; ctx.drawImage(heat, 0, 0, SIDE, SIDE);
  // top-k markers: hollow rings (the peak's colour stays visible inside), area proportional to
  // weight, the largest ring for the row's largest weight; a white halo keeps them visible on blue
  const top = mode === "weights" ? d.top : d.ctop, tw = mode === "weights" ? d.top_w : d.ctop_w;
  const svg = panel.querySelector("svg"), marks = [], rmax = S / 18;
  const wmax = Math.max(tw[n * K], 1e-30);
  for (let t = 0; t < K && t < N; t++) {
    const m = top[n * K + t], [cx, cy] = cellToPixel(Math.floor(m / W), m % W, H, W, S, S);
    const r = rmax * Math.sqrt(tw[n * K + t] / wmax), ring = {cx, cy, r, fill: "none", "vector-effect": "non-scaling-stroke"};
    marks.push(el("circle", {...ring, class: "halo", stroke: "white", "stroke-opacity": 0.8, "stroke-width": 3.5}));
    marks.push(el("circle", {...ring, class: "topk", stroke: "blue", "stroke-width": 1.8,
      "data-cell": `${Math.floor(m / W)},${m % W}`, "data-weight": tw[n * K + t]}));
  }
  const [qx, qy] = cellToPixel(i, j, H, W, S, S);
  svg.replaceChildren(...marks, cross(qx, qy, [i, j]));
  // the colour scale's top: this row's max
  const maxEl = panel.querySelector(".scale .max");
  maxEl.textContent = mode === "weights"
    ? `max a ${tw[n * K].toPrecision(3)} (${(tw[n * K] * N).toFixed(1)}x uniform)`
    : `max ||gamma a v|| ${tw[n * K].toPrecision(3)}`;
  maxEl.title = TITLES.max[mode];
  maxEl.dataset.max = tw[n * K];
  // the numbers of attention.stats_text, of the weights or of the contribution
  const T = TITLES[mode], st = mode === "weights" ? d.stats : d.cstats;
  const f = (v, p) => v.toFixed(p), pc = v => (100 * v).toFixed(1) + "%";
  const none = Number.isNaN(st[3 * n]), val = (v, fmt) => none ? "n/a" : fmt(v);
  const g = L.gamma >= 0 ? "+" + f(L.gamma, 3) : f(L.gamma, 3);
  const out = panel.querySelector(".stats");
  out.replaceChildren(
    stat(mode === "weights" ? "of the weights a_qk:" : "of the contribution ||gamma a v||:", none ? TITLES.contribution.none : T.head), "\n",
    stat(`gamma ${g}`, TITLES.gamma), "  ",
    stat(`top-${K} ${val(st[3 * n], pc)} (uniform ${pc(Math.min(K, N) / N)})`, T.top), "\n",
    stat(`H/logN ${val(st[3 * n + 1], v => f(v, 2))}`, T.H), "  ",
    stat(`dist ${val(st[3 * n + 2], v => f(v, 1) + "px")} (uniform ${f(distUniform[name][n], 1)})`, T.dist));
  if (mode === "contribution")
    out.append("\n", stat(`sum ||gamma a v|| ${d.csum[n].toPrecision(3)}`, T.sum));
  out.dataset.mode = mode;
}

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
  for (const L of DATA.layers) drawLayer(L, sd, x, y, mode);
  drawInterventions();
  drawFilmNote();
  document.body.dataset.ready = "1";
}

// the selected seed's image with each G layer's attention removed / made uniform (precomputed)
let ivSeed = null;
function drawInterventions() {
  if (ivSeed === state.seed) return;
  ivSeed = state.seed;
  const src = DATA.seeds[state.seed], rows = document.getElementById("iv-rows");
  const figure = (image, layer, mode, caption, delta) => {
    const fig = el("figure", {class: "iv", "data-layer": layer, "data-mode": mode});
    fig.append(el("img", {src: image, alt: `${layer} ${mode}`}));
    const cap = el("figcaption", {}, caption);
    if (delta !== undefined) {
      cap.append(" ", stat(`Δ ${delta.toFixed(4)}`, TITLES.delta));
      fig.dataset.delta = delta;
    }
    fig.append(cap);
    return fig;
  };
  rows.replaceChildren(...Object.entries(src.interventions).map(([name, iv]) => {
    const L = DATA.layers.find(L => L.name === name), row = el("div", {class: "iv-row", id: "iv-" + name});
    row.append(el("div", {class: "name", title: TITLES.gamma}, `${name}\ngamma ${L.gamma.toFixed(3)}`),
      figure(src.image, name, "original", `original, seed ${src.seed}`),
      figure(iv.remove.image, name, "remove", `${name} removed`, iv.remove.delta),
      figure(iv.uniform.image, name, "uniform", `${name} uniform`, iv.uniform.delta));
    return row;
  }));
  document.getElementById("interventions").hidden = !rows.children.length;
}

// the film is precomputed for one seed, layer and query: say which, and how to make another
function drawFilmNote() {
  const F = DATA.film;
  if (!F) return;
  const L = DATA.layers.find(L => L.name === state.layer);
  if (!L) return;
  const seed = DATA.seeds[state.seed].seed, [x, y] = state.pixel;
  const cell = pixelToCell(x, y, L.H, L.W, S, S);
  const filmCell = F.cell || pixelToCell(F.pixel[0], F.pixel[1], L.H, L.W, S, S);
  const same = seed === F.seed && state.layer === F.layer && cell.join() === filmCell.join();
  const note = document.getElementById("film-other");
  note.dataset.same = same;
  if (same) { note.textContent = "This is the selected seed, layer and query."; return; }
  const run = /\s/.test(F.run) ? `"${F.run}"` : F.run;
  const cmd = `python visualize_attn.py --checkpoint ${run} --view film --seed ${seed} --layer ${state.layer}` +
    (L.net === "D" ? " --with_d" : "") + (DATA.generator === "raw G" ? " --raw_g" : "") +
    ` --pixel ${x},${y} --out film.png`;
  note.replaceChildren(`You have selected seed ${seed}, ${state.layer} (the last panel you pointed at), ` +
    `pixel (${x}, ${y}); the film of that query is one command away (it writes film.png and film.gif): `,
    el("code", {id: "film-command"}, cmd));
}

(async () => {
  document.getElementById("describe").textContent = DATA.describe;
  drawScale(document.getElementById("legend-bar"));
  document.getElementById("rings-note").textContent =
    `blue rings: the ${K} most attended cells of the query, area proportional to weight`;
  const sel = document.getElementById("seed");
  DATA.seeds.forEach((s, idx) => sel.add(new Option(`seed ${s.seed}`, idx)));
  sel.addEventListener("change", () => { state.seed = +sel.value; render(); });
  const mode = document.getElementById("mode");
  mode.addEventListener("change", () => { state.mode = mode.value; render(); });
  makePanel("image", null);
  for (const L of DATA.layers) {
    makePanel(L.name, L);
    distUniform[L.name] = await unpack(L.dist_uniform, Float32Array);
  }
  render();
})();
if (DATA.film) {  // the same image and query at each saved checkpoint of the run
  const F = DATA.film, slider = document.getElementById("film-step");
  const show = i => {
    document.getElementById("film-image").src = F.frames[i].image;
    document.getElementById("film-label").textContent = `step ${F.frames[i].step} (${i + 1} of ${F.frames.length})`;
  };
  const query = F.pixel ? `pixel (${F.pixel[0]}, ${F.pixel[1]})` : `cell (${F.cell[0]}, ${F.cell[1]})`;
  document.getElementById("film-title").textContent =
    `${F.title}: the run's saved checkpoints, oldest to newest. Precomputed for seed ${F.seed}, ` +
    `layer ${F.layer}, query ${query} only.`;
  slider.max = F.frames.length - 1;
  slider.value = F.frames.length - 1;
  slider.addEventListener("input", () => show(+slider.value));
  show(F.frames.length - 1);
  document.getElementById("film").hidden = false;
}

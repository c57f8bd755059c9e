// Per-block weight strings of DiT Layer Injection, in the browser: the same grammar, presets and canonical
// form as vl_core/schedule.py (parse_block_weights / preset_blocks / format_block_weights), so the editor
// writes exactly what the node parses. Pure module (no ComfyUI import); tests/unit/test_block_weights_js.py
// checks it against the Python parser on the same strings.

export const PRESETS = ["all", "early", "middle", "late"];

const ENTRY = /^([A-Za-z_]+|\d+(?:\s*-\s*\d+)?)\s*(?::\s*(\S+))?$/;
// Python's float() accepts these spellings; Number() alone would also accept "" / "0x10" / "1_0" differently
const FLOAT = /^[+-]?(?:\d+(?:_\d+)*\.?(?:\d+(?:_\d+)*)?|\.\d+(?:_\d+)*)(?:[eE][+-]?\d+(?:_\d+)*)?$/;

/** Third of the model block i lies in: ⌊3·i / n⌋ (0 = early, 1 = middle, 2 = late). */
export function segment(i, n) {
  return Math.floor((3 * i) / n);
}

/** Block indices of a preset: all = 0..n−1; early / middle / late = segment 0 / 1 / 2. */
export function presetBlocks(name, n) {
  const key = name.trim().toLowerCase();
  if (key === "all") return [...Array(n).keys()];
  const seg = PRESETS.indexOf(key) - 1;
  if (seg < 0) throw new Error(`unknown block preset '${name}': expected one of ${PRESETS.join(", ")}`);
  return [...Array(n).keys()].filter((i) => segment(i, n) === seg);
}

/** Weights [n] of a block-weight string; throws Error with the node's wording when it cannot be read. */
export function parseBlockWeights(spec, n) {
  if (typeof spec !== "string" || !spec.trim()) throw new Error("block_weights is empty");
  const weights = new Array(n).fill(0);
  const last = n - 1;
  for (const raw of spec.split(/[,;]/)) {
    const entry = raw.trim();
    if (!entry) continue;
    const m = ENTRY.exec(entry);
    if (!m) throw new Error(`cannot read '${entry}' in block_weights`);
    const [, target, wtext] = m;
    let weight = 1.0;
    if (wtext !== undefined) {
      const t = wtext.trim().toLowerCase();
      weight = FLOAT.test(t) ? Number(t.replaceAll("_", "")) : NaN;
      if (!Number.isFinite(weight)) throw new Error(`weight '${wtext}' of '${entry}' is not a finite number`);
    }
    let blocks;
    if (/^[A-Za-z_]/.test(target)) {
      if (!PRESETS.includes(target.toLowerCase())) throw new Error(`unknown block preset '${target}'`);
      blocks = presetBlocks(target, n);
    } else {
      const [lo, hi = lo] = target.split("-").map((s) => parseInt(s.trim(), 10));
      if (lo > hi) throw new Error(`block range '${target}' runs backwards: write ${hi}-${lo}`);
      if (hi > last) throw new Error(`block ${hi} is beyond the editor's ${n} blocks (0-${last})`);
      blocks = [];
      for (let i = lo; i <= hi; i++) blocks.push(i);
    }
    for (const i of blocks) weights[i] = weight;
  }
  return weights;
}

/** A float as Python's repr writes it (1 → "1.0", 0.35 → "0.35"), so JS and Python canonical strings agree. */
export function pyFloat(w) {
  if (Number.isInteger(w) && Math.abs(w) < 1e16) return w.toFixed(1);
  return String(w); // same shortest round-trip digits as Python's repr (exponent spelling aside)
}

/** Canonical string (runs of equal non-zero weights as ranges); all-zero weights give "all:0.0" (parses to
 *  zeros: the node then installs nothing; the node's own formatter returns "" there, which it refuses as empty). */
export function formatBlockWeights(weights) {
  const parts = [];
  let i = 0;
  const n = weights.length;
  while (i < n) {
    const w = Number(weights[i]);
    let j = i;
    while (j + 1 < n && Number(weights[j + 1]) === w) j++;
    if (w !== 0) parts.push(i === j ? `${i}:${pyFloat(w)}` : `${i}-${j}:${pyFloat(w)}`);
    i = j + 1;
  }
  return parts.length ? parts.join(", ") : "all:0.0";
}

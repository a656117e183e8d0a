// The run graph: laid out here (left to right by dependency level, in one
// horizontal band per stage), drawn as SVG, panned and zoomed by a single
// transform, updated in place as task states change.
//
// The layout is a longest-path layering plus one barycentre pass to order
// each column: linear in the graph's size, so 1,000 tasks lay out in a few
// milliseconds, and it is exactly the picture the issue asks for (columns
// = dependency levels, bands = stages), which general layered-layout
// libraries only approximate with constraints.

import { h, s } from './dom';
import type { Edge } from './api';

export interface GNode {
  label: string;
  stage: string | null;
  kind: string;
}

export interface NodeStatus {
  state: string; // pending, running, succeeded, cached, failed, skipped, cancelled, queued
  detail: string; // "1.2 s", "running 3 s"
  badge: string | null; // "cached", "will be cached", "will run: …"
  badgeKind: 'hit' | 'run' | 'info' | null;
}

const W = 210, H = 50, COL = 270, ROW = 64, BAND_GAP = 36, BAND_HEAD = 26;
const NO_STAGE = '(no stage)';

interface Placed { x: number; y: number; level: number; band: string }

/** Orders stages so a stage comes after those it waits for. */
export function stageOrder(stages: Record<string, { after?: string[] }>, used: Set<string>): string[] {
  const out: string[] = [];
  const seen = new Set<string>();
  const visit = (n: string, depth: number) => {
    if (seen.has(n) || depth > 1000) return;
    seen.add(n);
    for (const a of stages[n]?.after ?? []) visit(a, depth + 1);
    out.push(n);
  };
  for (const n of Object.keys(stages).sort()) visit(n, 0);
  for (const n of [...used].sort()) visit(n, 0);
  return out.filter((n) => used.has(n));
}

export function layout(nodes: GNode[], edges: Edge[], stages: Record<string, { after?: string[] }>, collapsed: Set<string>) {
  const byLabel = new Map(nodes.map((n) => [n.label, n]));
  const preds = new Map<string, string[]>();
  for (const e of edges) {
    if (!byLabel.has(e.from) || !byLabel.has(e.to)) continue;
    (preds.get(e.to) ?? preds.set(e.to, []).get(e.to)!).push(e.from);
  }
  // Longest path from the sources (iterative, cycle-safe).
  const level = new Map<string, number>();
  const visiting = new Set<string>();
  const lvl = (start: string): number => {
    const stack: [string, number][] = [[start, 0]];
    while (stack.length) {
      const [n, i] = stack[stack.length - 1];
      if (level.has(n)) { stack.pop(); continue; }
      const ps = preds.get(n) ?? [];
      if (i < ps.length) {
        stack[stack.length - 1][1]++;
        const p = ps[i];
        if (!level.has(p) && !visiting.has(p)) { visiting.add(p); stack.push([p, 0]); }
        continue;
      }
      let l = 0;
      for (const p of ps) l = Math.max(l, (level.get(p) ?? 0) + 1);
      level.set(n, l);
      visiting.delete(n);
      stack.pop();
    }
    return level.get(start)!;
  };
  for (const n of nodes) lvl(n.label);

  const bandOf = (n: GNode) => n.stage ?? NO_STAGE;
  const used = new Set(nodes.map(bandOf));
  const named = stageOrder(stages, new Set([...used].filter((b) => b !== NO_STAGE)));
  const bands = used.has(NO_STAGE) ? [NO_STAGE, ...named] : named;

  const placed = new Map<string, Placed>();
  const bandBox: { name: string; y: number; h: number; count: number; minX: number; maxX: number }[] = [];
  let y = 0;
  for (const band of bands) {
    const members = nodes.filter((n) => bandOf(n) === band);
    const cols = new Map<number, GNode[]>();
    for (const m of members) {
      const l = level.get(m.label) ?? 0;
      (cols.get(l) ?? cols.set(l, []).get(l)!).push(m);
    }
    const levels = [...cols.keys()].sort((a, b) => a - b);
    const minX = Math.min(...levels) * COL, maxX = Math.max(...levels) * COL + W;
    if (collapsed.has(band)) {
      for (const m of members) placed.set(m.label, { x: minX, y: y + BAND_HEAD, level: level.get(m.label)!, band });
      bandBox.push({ name: band, y, h: BAND_HEAD + H + 12, count: members.length, minX, maxX });
      y += BAND_HEAD + H + 12 + BAND_GAP;
      continue;
    }
    let rows = 0;
    for (const l of levels) {
      const col = cols.get(l)!;
      // Order by where the predecessors are (already placed: lower levels or earlier bands).
      const bary = (n: GNode) => {
        const ps = (preds.get(n.label) ?? []).map((p) => placed.get(p)?.y).filter((v): v is number => v !== undefined);
        return ps.length ? ps.reduce((a, b) => a + b, 0) / ps.length : Infinity;
      };
      const keyed = col.map((n) => [bary(n), n] as const);
      keyed.sort((a, b) => (a[0] - b[0]) || (a[1].label < b[1].label ? -1 : 1));
      keyed.forEach(([, n], i) => placed.set(n.label, { x: l * COL, y: y + BAND_HEAD + i * ROW, level: l, band }));
      rows = Math.max(rows, col.length);
    }
    const hgt = BAND_HEAD + rows * ROW;
    bandBox.push({ name: band, y, h: hgt, count: members.length, minX, maxX });
    y += hgt + BAND_GAP;
  }
  const width = Math.max(W, ...[...placed.values()].map((p) => p.x + W));
  return { placed, bands: bandBox, width, height: y, levels: Math.max(0, ...level.values()) + 1 };
}

function edgePath(a: Placed, b: Placed): string {
  const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2;
  const dx = Math.max(40, (x2 - x1) / 2);
  return `M${x1},${y1} C${x1 + dx},${y1} ${x2 - dx},${y2} ${x2},${y2}`;
}

function short(label: string, max = 28): string {
  return label.length > max ? '…' + label.slice(label.length - max + 1) : label;
}

export interface GraphOptions {
  onSelect: (label: string) => void;
}

export class GraphView {
  readonly el: HTMLDivElement;
  private svg: SVGSVGElement;
  private world: SVGGElement;
  private nodesEl = new Map<string, { g: SVGGElement; detail: SVGTextElement; badge: SVGTextElement; badgeBox: SVGRectElement }>();
  private tx = 20; private ty = 20; private k = 1;
  private collapsed = new Set<string>();
  private status = new Map<string, NodeStatus>();
  private selected: string | null = null;
  private matches: string[] = [];
  private info: HTMLSpanElement;

  constructor(private nodes: GNode[], private edges: Edge[], private stages: Record<string, { after?: string[] }>, private opts: GraphOptions) {
    this.world = s('g');
    this.svg = s('svg', { class: 'graph-svg', 'data-testid': 'graph' }, s('defs', null,
      ...(['input', 'transform', 'merge_base', 'merge_side'] as const).map((k) =>
        s('marker', { id: `arrow-${k}`, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
          s('path', { d: 'M0,0 L10,5 L0,10 z', class: `arrow e-${k}` })))), this.world);
    const search = h('input', { type: 'search', placeholder: 'Search a label…', class: 'graph-search', 'aria-label': 'Search a label' });
    search.addEventListener('input', () => this.search(search.value));
    search.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && this.matches.length) {
        const first = this.matches.shift()!;
        this.matches.push(first);
        this.focus(first);
        this.opts.onSelect(first);
      }
    });
    this.info = h('span', { class: 'graph-info' });
    const btn = (text: string, title: string, f: () => void) => h('button', { class: 'small', title, onclick: f as EventListener }, text);
    const tools = h('div', { class: 'graph-tools' }, search,
      btn('−', 'Zoom out', () => this.zoomBy(1 / 1.25)),
      btn('+', 'Zoom in', () => this.zoomBy(1.25)),
      btn('Fit', 'Fit the graph in view', () => this.fit()),
      btn('Collapse all', 'Collapse every stage', () => { this.collapsed = new Set(this.bandNames()); this.draw(); }),
      btn('Expand all', 'Expand every stage', () => { this.collapsed.clear(); this.draw(); }),
      this.info,
      h('span', { class: 'legend' },
        h('span', { class: 'lg e-input' }, 'input'), h('span', { class: 'lg e-transform' }, 'transform'),
        h('span', { class: 'lg e-merge_base' }, 'merge base'), h('span', { class: 'lg e-merge_side' }, 'merge side')));
    this.el = h('div', { class: 'graph' }, tools, h('div', { class: 'graph-canvas' }, this.svg));
    this.bindPanZoom();
    this.draw();
  }

  private bandNames(): string[] {
    return [...new Set(this.nodes.map((n) => n.stage ?? NO_STAGE))];
  }

  private bindPanZoom(): void {
    let drag: { x: number; y: number; tx: number; ty: number } | null = null;
    this.svg.addEventListener('pointerdown', (e) => {
      if ((e.target as Element).closest('.node, .band-head')) return;
      drag = { x: e.clientX, y: e.clientY, tx: this.tx, ty: this.ty };
      this.svg.setPointerCapture(e.pointerId);
    });
    this.svg.addEventListener('pointermove', (e) => {
      if (!drag) return;
      this.tx = drag.tx + e.clientX - drag.x;
      this.ty = drag.ty + e.clientY - drag.y;
      this.apply();
    });
    this.svg.addEventListener('pointerup', () => { drag = null; });
    this.svg.addEventListener('wheel', (e) => {
      e.preventDefault();
      const r = this.svg.getBoundingClientRect();
      this.zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX - r.left, e.clientY - r.top);
    }, { passive: false });
  }

  private zoomAt(f: number, cx: number, cy: number): void {
    const k = Math.max(0.05, Math.min(3, this.k * f));
    this.tx = cx - ((cx - this.tx) * k) / this.k;
    this.ty = cy - ((cy - this.ty) * k) / this.k;
    this.k = k;
    this.apply();
  }

  private zoomBy(f: number): void {
    const r = this.svg.getBoundingClientRect();
    this.zoomAt(f, r.width / 2, r.height / 2);
  }

  private apply(): void {
    this.world.setAttribute('transform', `translate(${this.tx},${this.ty}) scale(${this.k})`);
  }

  private box = { width: 0, height: 0 };
  private placed = new Map<string, Placed>();

  fit(): void {
    const r = this.svg.getBoundingClientRect();
    const w = r.width || 1000, hh = r.height || 600;
    this.k = Math.max(this.nodes.length > 200 ? 0.05 : 0.45, Math.min(1, (w - 40) / this.box.width, (hh - 40) / this.box.height));
    this.tx = 20; this.ty = 20;
    this.apply();
  }

  focus(label: string): void {
    const p = this.placed.get(label);
    if (!p) return;
    const r = this.svg.getBoundingClientRect();
    if (this.k < 0.6) this.k = 0.8;
    this.tx = r.width / 2 - (p.x + W / 2) * this.k;
    this.ty = r.height / 2 - (p.y + H / 2) * this.k;
    this.apply();
  }

  select(label: string | null): void {
    if (this.selected) this.nodesEl.get(this.selected)?.g.classList.remove('selected');
    this.selected = label;
    if (label) this.nodesEl.get(label)?.g.classList.add('selected');
  }

  search(q: string): void {
    const needle = q.trim().toLowerCase();
    this.matches = [];
    for (const [label, n] of this.nodesEl) {
      const hit = needle !== '' && label.toLowerCase().includes(needle);
      n.g.classList.toggle('match', hit);
      n.g.classList.toggle('dimmed', needle !== '' && !hit);
      if (hit) this.matches.push(label);
    }
    this.info.textContent = needle ? `${this.matches.length} match${this.matches.length === 1 ? '' : 'es'}` : '';
    if (this.matches.length) {
      // A match in a collapsed stage opens it.
      const bands = new Set(this.matches.map((m) => this.nodes.find((n) => n.label === m)?.stage ?? NO_STAGE));
      if ([...bands].some((b) => this.collapsed.has(b))) {
        for (const b of bands) this.collapsed.delete(b);
        this.draw();
        this.search(q);
        return;
      }
      this.focus(this.matches[0]);
    }
  }

  private marked = new Set<string>();

  /** Marks nodes (the critical path) with the class `crit`. */
  mark(labels: Iterable<string>): void {
    const old = this.marked;
    this.marked = new Set(labels);
    for (const l of new Set([...old, ...this.marked])) {
      const n = this.nodesEl.get(l);
      if (n) this.paint(l, n);
    }
  }

  setStatus(label: string, st: NodeStatus): void {
    this.status.set(label, st);
    const n = this.nodesEl.get(label);
    if (n) this.paint(label, n);
    this.paintBands();
  }

  private paint(label: string, n: { g: SVGGElement; detail: SVGTextElement; badge: SVGTextElement; badgeBox: SVGRectElement }): void {
    const st = this.status.get(label);
    n.g.setAttribute('class', `node st-${st?.state ?? 'pending'}${label === this.selected ? ' selected' : ''}${this.marked.has(label) ? ' crit' : ''}`);
    n.detail.textContent = st ? st.detail : 'pending';
    const badge = st?.badge ?? '';
    n.badge.textContent = badge.length > 18 ? badge.slice(0, 17) + '…' : badge;
    n.badgeBox.setAttribute('class', `badge b-${st?.badgeKind ?? 'none'}`);
    const bw = badge ? Math.min(18, badge.length) * 6.4 + 10 : 0;
    n.badgeBox.setAttribute('width', String(bw));
    n.badgeBox.setAttribute('x', String(W - bw - 4));
    const title = n.g.querySelector('title');
    if (title) title.textContent = `${label}\n${st?.state ?? 'pending'} ${st?.detail ?? ''}${badge ? '\n' + badge : ''}`;
  }

  private bandSummaries = new Map<string, SVGTextElement>();

  private paintBands(): void {
    for (const [band, el] of this.bandSummaries) {
      const counts = new Map<string, number>();
      for (const n of this.nodes) {
        if ((n.stage ?? NO_STAGE) !== band) continue;
        const st = this.status.get(n.label)?.state ?? 'pending';
        counts.set(st, (counts.get(st) ?? 0) + 1);
      }
      el.textContent = [...counts].map(([k, v]) => `${v} ${k}`).join(' · ');
    }
  }

  draw(): void {
    const L = layout(this.nodes, this.edges, this.stages, this.collapsed);
    this.placed = L.placed;
    this.box = { width: L.width, height: L.height };
    this.nodesEl.clear();
    this.bandSummaries.clear();
    const bandsG = s('g', { class: 'bands' });
    for (const b of L.bands) {
      const isCollapsed = this.collapsed.has(b.name);
      const head = s('g', { class: 'band-head', role: 'button', 'data-stage': b.name },
        s('text', { x: 0, y: b.y + 16, class: 'band-title' }, `${isCollapsed ? '▸' : '▾'} ${b.name === NO_STAGE ? 'sources and unstaged' : 'stage ' + b.name} (${b.count})`));
      head.addEventListener('click', () => {
        if (this.collapsed.has(b.name)) this.collapsed.delete(b.name); else this.collapsed.add(b.name);
        this.draw();
      });
      bandsG.append(s('rect', { x: -12, y: b.y, width: L.width + 24, height: b.h, rx: 8, class: 'band' }), head);
      if (isCollapsed) {
        const sum = s('text', { x: b.minX + 12, y: b.y + BAND_HEAD + H / 2 + 5, class: 'band-summary' });
        bandsG.append(s('rect', { x: b.minX, y: b.y + BAND_HEAD, width: Math.max(W, b.maxX - b.minX), height: H, rx: 6, class: 'band-collapsed' }), sum);
        this.bandSummaries.set(b.name, sum);
      }
    }
    const edgesG = s('g', { class: 'edges' });
    for (const e of this.edges) {
      const a = L.placed.get(e.from), b = L.placed.get(e.to);
      if (!a || !b) continue;
      if (a.band === b.band && this.collapsed.has(a.band)) continue;
      edgesG.append(s('path', { d: edgePath(a, b), class: `edge e-${e.kind}`, 'marker-end': `url(#arrow-${e.kind})` }));
    }
    const nodesG = s('g', { class: 'nodes' });
    for (const n of this.nodes) {
      const p = L.placed.get(n.label)!;
      if (this.collapsed.has(p.band)) continue;
      const detail = s('text', { x: 10, y: 38, class: 'node-detail' });
      const badge = s('text', { x: W - 9, y: 39, class: 'node-badge', 'text-anchor': 'end' });
      const badgeBox = s('rect', { x: W, y: 27, height: 16, rx: 4, class: 'badge', width: 0 });
      const g = s('g', { class: 'node', transform: `translate(${p.x},${p.y})`, 'data-label': n.label, tabindex: 0 },
        s('title', null, n.label),
        s('rect', { width: W, height: H, rx: 6, class: 'node-box' }),
        s('rect', { width: 5, height: H, rx: 2, class: 'node-stripe' }),
        s('text', { x: 10, y: 19, class: 'node-label' }, short(n.label)),
        detail, badgeBox, badge);
      g.addEventListener('click', () => this.opts.onSelect(n.label));
      g.addEventListener('keydown', (e) => { if ((e as KeyboardEvent).key === 'Enter') this.opts.onSelect(n.label); });
      const entry = { g, detail, badge, badgeBox };
      this.nodesEl.set(n.label, entry);
      this.paint(n.label, entry);
      nodesG.append(g);
    }
    this.world.replaceChildren(bandsG, edgesG, nodesG);
    this.paintBands();
    this.apply();
  }
}

// The waterfall of a run: one row per task, a bar from its start to its end
// on the run's time axis (the part spent waiting for a job slot drawn
// lighter), the critical path marked. Rows are virtual: only those in view
// are in the DOM, so 1,000 tasks scroll and update as lightly as ten. Bars
// are placed in percent of the run's span, so a resize needs no redraw.

import { h } from './dom';
import { dur } from './util';

export interface WfTask {
  label: string;
  /** Start, in ms from the run's start (null: not started). */
  start: number | null;
  /** Time spent waiting for a job slot before working. */
  queued: number;
  /** Time worked; null while it runs. */
  duration: number | null;
  state: string; // succeeded, cached, kept, failed, running, skipped, cancelled
}

const ROW = 22;

/** Sets inline styles through the CSSOM (the CSP refuses `style` attributes). */
function css<E extends HTMLElement>(el: E, props: Partial<Record<'left' | 'width' | 'right', string>>): E {
  for (const [k, v] of Object.entries(props)) el.style.setProperty(k, v!);
  return el;
}
const OVERSCAN = 12;

export interface WaterfallOptions { onSelect: (label: string) => void }

export class Waterfall {
  readonly el: HTMLDivElement;
  private scroll: HTMLDivElement;
  private spacer: HTMLDivElement;
  private rowsEl: HTMLDivElement;
  private axis: HTMLDivElement;
  private info: HTMLSpanElement;
  private tasks: WfTask[] = [];
  private shown: WfTask[] = [];
  private critical = new Set<string>();
  private span = 1;
  private now: number | null = null;
  private selected: string | null = null;
  private onlyCritical = false;
  private filter = '';
  private sort: 'start' | 'duration' = 'start';
  private drawn = { first: -1, last: -1 };

  constructor(private opts: WaterfallOptions) {
    const search = h('input', { type: 'search', placeholder: 'Filter labels…', class: 'graph-search', 'aria-label': 'Filter labels', 'data-testid': 'wf-filter' });
    search.addEventListener('input', () => { this.filter = search.value.trim().toLowerCase(); this.relayout(); });
    const crit = h('input', { type: 'checkbox', 'data-testid': 'wf-only-critical' });
    crit.addEventListener('change', () => { this.onlyCritical = crit.checked; this.relayout(); });
    const sort = h('select', { 'aria-label': 'Order rows', 'data-testid': 'wf-sort' },
      h('option', { value: 'start' }, 'in start order'), h('option', { value: 'duration' }, 'longest first'));
    sort.addEventListener('change', () => { this.sort = sort.value as 'start' | 'duration'; this.relayout(); });
    this.info = h('span', { class: 'graph-info' });
    const tools = h('div', { class: 'graph-tools' }, search,
      h('label', { class: 'check' }, crit, ' only the critical path'), sort, this.info,
      h('span', { class: 'legend' },
        h('span', { class: 'lgb wf-queue-key' }, 'waiting for a job slot'),
        h('span', { class: 'lgb st-succeeded' }, 'ran'),
        h('span', { class: 'lgb st-cached' }, 'from the cache'),
        h('span', { class: 'lgb st-failed' }, 'failed'),
        h('span', { class: 'lgb crit-key' }, 'critical path')));
    this.axis = h('div', { class: 'wf-axis' });
    this.spacer = h('div', { class: 'wf-spacer' });
    this.rowsEl = h('div', { class: 'wf-rows' });
    this.scroll = h('div', { class: 'wf-scroll', tabindex: 0 }, this.spacer, this.rowsEl);
    this.scroll.addEventListener('scroll', () => this.paint(false), { passive: true });
    this.rowsEl.addEventListener('click', (e) => {
      const row = (e.target as Element).closest('.wf-row') as HTMLElement | null;
      if (row?.dataset.label) this.opts.onSelect(row.dataset.label);
    });
    this.el = h('div', { class: 'graph waterfall', 'data-testid': 'waterfall' }, tools,
      h('div', { class: 'wf-head' }, h('div', { class: 'wf-label wf-label-head' }, 'task'), this.axis), this.scroll);
    if (typeof ResizeObserver !== 'undefined') new ResizeObserver(() => this.paint(false)).observe(this.scroll);
  }

  /** New data: every task, the run's span so far (ms) and, while it runs, the run's now (ms). */
  update(tasks: WfTask[], span: number, now: number | null, critical: Iterable<string> | null): void {
    this.tasks = tasks;
    this.span = Math.max(1, span);
    this.now = now;
    if (critical) this.critical = new Set(critical);
    this.relayout();
  }

  select(label: string | null): void {
    this.selected = label;
    for (const r of this.rowsEl.children) (r as HTMLElement).classList.toggle('selected', (r as HTMLElement).dataset.label === label);
  }

  private relayout(): void {
    let rows = this.tasks;
    if (this.onlyCritical) rows = rows.filter((t) => this.critical.has(t.label));
    if (this.filter) rows = rows.filter((t) => t.label.toLowerCase().includes(this.filter));
    const end = (t: WfTask) => (t.start ?? Infinity) + t.queued + (t.duration ?? 0);
    const len = (t: WfTask) => t.duration ?? (this.now !== null && t.start !== null ? this.now - t.start - t.queued : 0);
    rows = [...rows].sort(this.sort === 'start'
      ? (a, b) => ((a.start ?? Infinity) - (b.start ?? Infinity)) || (end(a) - end(b)) || (a.label < b.label ? -1 : 1)
      : (a, b) => (len(b) - len(a)) || (a.label < b.label ? -1 : 1));
    this.shown = rows;
    this.spacer.style.height = `${rows.length * ROW}px`;
    const hidden = this.tasks.length - rows.length;
    this.info.textContent = `${rows.length} task${rows.length === 1 ? '' : 's'}${hidden ? ` (${hidden} hidden)` : ''} over ${dur(this.span)}`;
    this.drawAxis();
    this.paint(true);
  }

  private drawAxis(): void {
    // About eight ticks at a round step.
    const raw = this.span / 8;
    const steps = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10_000, 15_000, 30_000, 60_000, 120_000, 300_000, 600_000, 900_000, 1_800_000, 3_600_000];
    const step = steps.find((s) => s >= raw) ?? Math.ceil(raw / 3_600_000) * 3_600_000;
    const ticks: HTMLElement[] = [];
    for (let t = 0; t <= this.span; t += step) {
      const tick = h('span', { class: 't' }, t === 0 ? '0' : dur(t));
      tick.style.left = `${(t / this.span) * 100}%`;
      ticks.push(tick);
    }
    this.axis.replaceChildren(...ticks);
  }

  private paint(force: boolean): void {
    const top = this.scroll.scrollTop, height = this.scroll.clientHeight || 600;
    const first = Math.max(0, Math.floor(top / ROW) - OVERSCAN);
    const last = Math.min(this.shown.length, Math.ceil((top + height) / ROW) + OVERSCAN);
    if (!force && first === this.drawn.first && last === this.drawn.last) return;
    this.drawn = { first, last };
    const pct = (ms: number) => `${Math.max(0, Math.min(100, (ms / this.span) * 100))}%`;
    const out: HTMLElement[] = [];
    for (let i = first; i < last; i++) {
      const t = this.shown[i];
      const crit = this.critical.has(t.label);
      const track = h('div', { class: 'wf-track' });
      let text = 'not started';
      if (t.start !== null) {
        const work = t.duration ?? Math.max(0, (this.now ?? t.start) - t.start - t.queued);
        if (t.queued > 0) {
          track.append(css(h('div', { class: 'wf-queue' }), { left: pct(t.start), width: pct(t.queued) }));
        }
        const barStart = t.start + t.queued;
        track.append(css(h('div', { class: `wf-bar st-${t.state}${crit ? ' crit' : ''}` }), { left: pct(barStart), width: pct(work) }));
        const startPct = (barStart / this.span) * 100, endPct = ((barStart + work) / this.span) * 100;
        const label = `${t.state === 'running' ? 'running ' : ''}${dur(work)}`;
        // The duration after the bar; before it when the bar ends near the right edge.
        track.append(endPct > 82
          ? css(h('span', { class: 'wf-dur before' }, label), { right: `${100 - startPct}%` })
          : css(h('span', { class: 'wf-dur' }, label), { left: `${endPct}%` }));
        text = `${t.state}; started at ${dur(t.start)}${t.queued ? `, waited ${dur(t.queued)} for a job slot` : ''}, ${t.state === 'running' ? 'running for' : 'took'} ${dur(work)}`;
      }
      const row = h('div', {
        class: `wf-row${crit ? ' crit' : ''}${t.label === this.selected ? ' selected' : ''}`,
        'data-label': t.label, 'data-testid': 'wf-row', 'data-state': t.state, role: 'button', tabindex: -1,
        title: `${t.label}\n${text}${crit ? '\non the critical path' : ''}`,
      }, h('div', { class: 'wf-label' }, crit ? h('span', { class: 'crit-mark', 'aria-label': 'on the critical path' }, '◆') : null, t.label), track);
      row.style.transform = `translateY(${i * ROW}px)`;
      out.push(row);
    }
    this.rowsEl.replaceChildren(...out);
  }
}

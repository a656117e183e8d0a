// A task's log: held as a few large strings plus a typed-array index of
// line starts (8 bytes a line, not a string object each), drawn by a
// virtual list that keeps only the visible rows in the DOM, so a log of a
// million lines scrolls as lightly as one of ten.

import { applyStyle, hasEscape, parseLine, PLAIN, type Style } from './ansi';
import { h } from './dom';
import { headers } from './api';

const CHECK_EVERY = 256;

class U32 {
  a = new Uint32Array(1024);
  n = 0;
  push(v: number): void {
    if (this.n === this.a.length) {
      const b = new Uint32Array(this.a.length * 2);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.n++] = v;
  }
}

/** The lines of a log, appended as bytes arrive. */
export class LogModel {
  chunks: string[] = [];
  private lower: (string | undefined)[] = [];
  private chunkOf = new U32();
  private startOf = new U32();
  private checkpoints: Style[] = [];
  private style: Style = PLAIN;
  private partial = '';
  bytes = 0;
  onChange: (() => void) | null = null;

  get lines(): number {
    return this.chunkOf.n + (this.partial ? 1 : 0);
  }

  /** Adds text; only whole lines are indexed until `finish`. */
  append(text: string): void {
    const all = this.partial + text;
    const last = all.lastIndexOf('\n');
    if (last < 0) {
      this.partial = all;
    } else {
      this.partial = all.slice(last + 1);
      this.addChunk(all.slice(0, last + 1));
    }
    this.onChange?.();
  }

  finish(): void {
    if (this.partial) {
      this.addChunk(this.partial + '\n');
      this.partial = '';
    }
    this.onChange?.();
  }

  private addChunk(chunk: string): void {
    const c = this.chunks.length;
    this.chunks.push(chunk);
    const escapes = hasEscape(chunk);
    let pos = 0;
    while (pos < chunk.length) {
      const line = this.chunkOf.n;
      if (line % CHECK_EVERY === 0) this.checkpoints.push(this.style);
      this.chunkOf.push(c);
      this.startOf.push(pos);
      const nl = chunk.indexOf('\n', pos);
      const end = nl < 0 ? chunk.length : nl;
      if (escapes) {
        const text = chunk.slice(pos, end);
        if (hasEscape(text)) this.style = parseLine(text, this.style).end;
      }
      pos = end + 1;
    }
  }

  line(i: number): string {
    if (i >= this.chunkOf.n) return i === this.chunkOf.n ? this.partial : '';
    const c = this.chunkOf.a[i];
    const start = this.startOf.a[i];
    const chunk = this.chunks[c];
    const end = i + 1 < this.chunkOf.n && this.chunkOf.a[i + 1] === c ? this.startOf.a[i + 1] - 1 : chunk.length - 1;
    return chunk.slice(start, end);
  }

  /** The style in force where line `i` starts. */
  styleAt(i: number): Style {
    const k = Math.min(Math.floor(i / CHECK_EVERY), this.checkpoints.length - 1);
    if (k < 0) return PLAIN;
    let st = this.checkpoints[k];
    for (let j = k * CHECK_EVERY; j < i; j++) {
      const t = this.line(j);
      if (hasEscape(t)) st = parseLine(t, st).end;
    }
    return st;
  }

  /** Lines holding `q` (case-insensitive), at most `max`. */
  search(q: string, max = 100_000): number[] {
    const out: number[] = [];
    if (!q) return out;
    const needle = q.toLowerCase();
    for (let c = 0; c < this.chunks.length && out.length < max; c++) {
      const hay = (this.lower[c] ??= this.chunks[c].toLowerCase());
      let at = hay.indexOf(needle);
      while (at >= 0 && out.length < max) {
        const line = this.lineAt(c, at);
        if (out[out.length - 1] !== line) out.push(line);
        at = hay.indexOf(needle, at + needle.length);
      }
    }
    if (this.partial.toLowerCase().includes(needle)) out.push(this.chunkOf.n);
    return out;
  }

  private lineAt(c: number, offset: number): number {
    // Binary search over the lines of chunk `c`.
    let lo = 0, hi = this.chunkOf.n - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      const mc = this.chunkOf.a[mid];
      if (mc < c || (mc === c && this.startOf.a[mid] <= offset)) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  text(): string {
    return this.chunks.join('') + this.partial;
  }
}

/**
 * Fetches a log into `model`: pages of what is there, then (while the task
 * runs) the live stream, resuming from the bytes it has if the connection
 * drops. Resolves when the log is complete.
 */
export async function loadLog(url: string, model: LogModel, signal: AbortSignal): Promise<void> {
  let offset = 0, failures = 0, follow = false;
  const dec = new TextDecoder();
  while (!signal.aborted) {
    try {
      const res = await fetch(`${url}?offset=${offset}${follow ? '&follow=true' : ''}`, { headers: headers(), signal });
      if (!res.ok) throw new Error(`HTTP ${res.status}`);
      const reader = res.body!.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        offset += value.byteLength;
        model.bytes = offset;
        model.append(dec.decode(value, { stream: true }));
      }
      failures = 0;
      if (follow) {
        // The stream ends with the task (or the connection): ask where it stands.
        follow = false;
        continue;
      }
      const size = Number(res.headers.get('x-log-size'));
      if (offset < size) continue;
      if (res.headers.get('x-log-complete') === 'true') break;
      follow = true;
    } catch {
      if (signal.aborted) return;
      await new Promise((r) => setTimeout(r, Math.min(500 * 2 ** failures++, 5000)));
    }
  }
  model.append(dec.decode());
  model.finish();
}

/** The virtual list of a [`LogModel`]. */
export class LogView {
  readonly el: HTMLDivElement;
  private scroller: HTMLDivElement;
  private spacer: HTMLDivElement;
  private rows: HTMLDivElement;
  private lineH = 18;
  private follow = true;
  private raf = 0;
  private marked = -1;
  private programmatic = false;
  private static readonly MAX_PX = 8_000_000;

  constructor(private model: LogModel) {
    this.rows = h('div', { class: 'log-rows' });
    this.spacer = h('div', { class: 'log-spacer' });
    this.scroller = h('div', { class: 'log-scroll', tabindex: 0, 'data-testid': 'log' }, this.spacer, this.rows);
    this.el = h('div', { class: 'log' }, this.scroller);
    this.scroller.addEventListener('scroll', () => {
      if (!this.programmatic) {
        const atEnd = this.scroller.scrollTop + this.scroller.clientHeight >= this.scroller.scrollHeight - 4;
        this.setFollow(atEnd);
      }
      this.programmatic = false;
      this.schedule();
    });
    model.onChange = () => this.schedule();
    new ResizeObserver(() => this.schedule()).observe(this.scroller);
  }

  onFollow: ((on: boolean) => void) | null = null;

  setFollow(on: boolean): void {
    if (this.follow === on) return;
    this.follow = on;
    this.onFollow?.(on);
    if (on) this.schedule();
  }

  /** Scrolls so line `i` is in view, and marks it. */
  reveal(i: number): void {
    this.marked = i;
    this.setFollow(false);
    const { top } = this.geometry();
    this.programmatic = true;
    this.scroller.scrollTop = top(i) - this.scroller.clientHeight / 3;
    this.schedule();
  }

  private geometry() {
    const n = Math.max(1, this.model.lines);
    const full = n * this.lineH;
    const height = Math.min(full, LogView.MAX_PX);
    const view = this.scroller.clientHeight || 400;
    // Past MAX_PX the scrollbar is scaled: position → line, proportionally.
    const scale = full > height ? (n * this.lineH - view) / Math.max(1, height - view) : 1;
    return {
      height,
      first: (scrollTop: number) => Math.floor((scrollTop * scale) / this.lineH),
      top: (line: number) => (line * this.lineH) / scale,
    };
  }

  private schedule(): void {
    if (!this.raf) this.raf = requestAnimationFrame(() => { this.raf = 0; this.render(); });
  }

  private render(): void {
    const g = this.geometry();
    this.spacer.style.height = `${g.height}px`;
    if (this.follow) {
      this.programmatic = true;
      this.scroller.scrollTop = g.height;
    }
    const view = this.scroller.clientHeight || 400;
    const count = Math.ceil(view / this.lineH) + 2;
    const n = this.model.lines;
    let first = g.first(this.scroller.scrollTop);
    first = Math.max(0, Math.min(first, n - count + 1));
    const width = String(Math.max(1, n)).length;
    const frag: HTMLElement[] = [];
    let st = this.model.styleAt(first);
    for (let i = first; i < Math.min(n, first + count); i++) {
      const text = this.model.line(i);
      const row = h('div', { class: i === this.marked ? 'log-row marked' : 'log-row' },
        h('span', { class: 'log-no' }, String(i + 1).padStart(width, ' ')));
      const body = h('span', { class: 'log-text' });
      if (st === PLAIN && !hasEscape(text)) {
        body.textContent = text;
      } else {
        const { runs, end } = parseLine(text, st);
        for (const r of runs) {
          const span = document.createElement('span');
          span.textContent = r.text;
          if (r.style) applyStyle(span, r.style);
          body.appendChild(span);
        }
        st = end;
      }
      row.appendChild(body);
      frag.push(row);
    }
    // The rows sit where their first line is (exactly, unless the bar is scaled).
    const offset = g.height < LogView.MAX_PX ? first * this.lineH : this.scroller.scrollTop;
    this.rows.style.transform = `translateY(${offset}px)`;
    this.rows.replaceChildren(...frag);
  }
}

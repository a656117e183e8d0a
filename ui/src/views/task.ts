// The task panel: live log, why it ran (action key and the changes that
// made it miss, down to the paths of changed inputs), the output layer as a
// file browser, and the diff against the task's previous output.

import { api, ApiError, download, headers, type RunRecord, type TaskRecord } from '../api';
import { h, fill } from '../dom';
import { LogModel, LogView, loadLog } from '../logview';
import { lineDiff, hunks } from '../linediff';
import { bytes, dur } from '../util';

export const TEXT_CAP = 1 << 20;

export interface TaskCtx {
  run: RunRecord;
  label: string;
  workspace: string | null;
  /** The live state (from events) when the record does not have it yet. */
  live: { state: string; started: number | null } | null;
}

function msg(e: unknown): string {
  return e instanceof Error ? e.message : String(e);
}

function shortDigest(d: string | null | undefined): string {
  return d ? d.slice(0, 12) : '–';
}

export function taskPanel(ctx: TaskCtx, tab: string, onTab: (t: string) => void): { el: HTMLElement; close: () => void } {
  const ctl = new AbortController();
  const rec: TaskRecord | undefined = ctx.run.tasks[ctx.label];
  const state = rec ? (rec.cached ? 'cached' : rec.reused ? 'kept' : rec.state) : ctx.live?.state ?? 'pending';
  const tabs = ['log', 'why', 'files', 'diff'];
  const names: Record<string, string> = { log: 'Log', why: 'Why / key', files: 'Output files', diff: 'Diff vs previous' };
  const content = h('div', { class: 'tab-content' });
  const el = h('aside', { class: 'task-panel', 'data-testid': 'task-panel' },
    h('div', { class: 'task-head' },
      h('h2', { 'data-testid': 'task-label' }, ctx.label),
      h('span', { class: `pill st-${state}`, 'data-testid': 'task-state' }, state),
      rec ? h('span', { class: 'muted' }, ` ${dur(rec.duration_ms)}`) : null,
      rec?.exit_code !== null && rec?.exit_code !== undefined ? h('span', { class: 'muted' }, ` · exit ${rec.exit_code}`) : null,
      rec?.attempts && rec.attempts > 1 ? h('span', { class: 'muted' }, ` · ${rec.attempts} attempts`) : null),
    rec?.error ? h('div', { class: 'banner error task-error' }, rec.error) : null,
    h('div', { class: 'tabs', role: 'tablist' }, tabs.map((t) =>
      h('button', { class: t === tab ? 'tab active' : 'tab', role: 'tab', 'data-tab': t, onclick: (() => onTab(t)) as EventListener }, names[t]))),
    content);
  const show = { log: logTab, why: whyTab, files: filesTab, diff: diffTab }[tab] ?? logTab;
  show(ctx, rec, content, ctl.signal);
  return { el, close: () => ctl.abort() };
}

function logTab(ctx: TaskCtx, rec: TaskRecord | undefined, root: HTMLElement, signal: AbortSignal): void {
  const model = new LogModel();
  const view = new LogView(model);
  const url = api.logUrl(ctx.run.id, ctx.label);
  const info = h('span', { class: 'muted', 'data-testid': 'log-info' });
  const follow = h('button', { class: 'small toggle on', 'data-testid': 'follow' }, 'Follow');
  follow.addEventListener('click', () => view.setFollow(!follow.classList.contains('on')));
  view.onFollow = (on) => follow.classList.toggle('on', on);
  const q = h('input', { type: 'search', placeholder: 'Search the log', 'aria-label': 'Search the log', 'data-testid': 'log-search' });
  const found = h('span', { class: 'muted', 'data-testid': 'log-found' });
  let hits: number[] = [], at = -1, last = '';
  const go = (d: number) => {
    if (q.value !== last) { hits = model.search(q.value); last = q.value; at = d > 0 ? -1 : 0; }
    if (!hits.length) { found.textContent = q.value ? 'no match' : ''; return; }
    at = (at + d + hits.length) % hits.length;
    found.textContent = `${at + 1} of ${hits.length}${hits.length >= 100_000 ? '+' : ''}`;
    view.reveal(hits[at]);
  };
  q.addEventListener('keydown', (e) => { if (e.key === 'Enter') go(e.shiftKey ? -1 : 1); });
  const dl = h('button', { class: 'small' }, 'Download');
  dl.addEventListener('click', async () => {
    // The whole log, page by page (8 MiB each), as the bytes the task wrote.
    const parts: Blob[] = [];
    let offset = 0;
    for (;;) {
      const res = await fetch(`${url}?offset=${offset}`, { headers: headers() });
      if (!res.ok) break;
      const b = await res.blob();
      parts.push(b);
      offset += b.size;
      if (b.size === 0 || offset >= Number(res.headers.get('x-log-size'))) break;
    }
    const href = URL.createObjectURL(new Blob(parts, { type: 'text/plain' }));
    const a = h('a', { href, download: `${ctx.label.replace(/[^A-Za-z0-9._-]+/g, '_')}.log` });
    document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(href), 10_000);
  });
  root.append(h('div', { class: 'toolbar' }, follow, q,
    h('button', { class: 'small', onclick: (() => go(-1)) as EventListener, title: 'Previous match' }, '↑'),
    h('button', { class: 'small', onclick: (() => go(1)) as EventListener, title: 'Next match' }, '↓'),
    found, h('span', { class: 'spacer' }), info, dl), view.el);
  let timer = 0;
  // An empty black box reads as "still loading": once the log is complete,
  // say the task printed nothing.
  let complete = false;
  const update = () => {
    info.textContent = complete && model.lines === 0 && model.bytes === 0
      ? 'the task printed nothing'
      : `${model.lines.toLocaleString()} lines · ${bytes(model.bytes)}`;
  };
  const prev = model.onChange;
  model.onChange = () => { prev?.(); if (!timer) timer = window.setTimeout(() => { timer = 0; update(); }, 200); };
  update();
  void loadLog(url, model, signal).then(() => { complete = true; update(); });
  void rec;
}

function whyTab(ctx: TaskCtx, rec: TaskRecord | undefined, root: HTMLElement, signal: AbortSignal): void {
  root.append(h('dl', { class: 'facts' },
    h('dt', null, 'action key'), h('dd', null, h('code', { 'data-testid': 'task-key' }, rec?.key ?? '–')),
    h('dt', null, 'output'), h('dd', null, h('code', null, rec?.output ?? '–')),
    h('dt', null, 'from cache'), h('dd', null, rec ? (rec.cached ? 'yes: nothing ran' : rec.reused ? 'kept from the run it re-ran' : 'no') : '–'),
    h('dt', null, 'waited for a job slot'), h('dd', null, rec ? dur(rec.queued_ms) : '–')));
  if (rec?.context && Object.keys(rec.context).length) {
    root.append(h('h3', null, 'Context passed on'), h('pre', { class: 'pre' }, Object.entries(rec.context).map(([k, v]) => `${k}=${v}\n`)));
  }
  const box = h('div', null, h('p', { class: 'muted' }, 'Asking the server why…'));
  root.append(box);
  if (!ctx.workspace) { fill(box, h('p', { class: 'muted' }, 'An inline run: explain needs a workspace.')); return; }
  api.explain(ctx.workspace, ctx.label).then(async (x) => {
    if (signal.aborted) return;
    const items = h('ul', { class: 'changes', 'data-testid': 'explain-changes' });
    fill(box,
      h('h3', null, 'Why it ran (latest action of this task)'),
      x.run !== ctx.run.id ? h('p', { class: 'muted' }, 'The latest action is from run ', h('a', { href: `/runs/${encodeURIComponent(x.run)}`, 'data-link': '' }, x.run), '.') : null,
      !x.has_previous ? h('p', null, 'No earlier action with another key is known: this is its first.') :
        x.changes.length ? items : h('p', null, 'The key is the same as the previous action\u2019s.'),
      h('details', null, h('summary', null, 'Action preimage (every field of the key)'), h('pre', { class: 'pre' }, JSON.stringify(x.preimage, null, 2))));
    for (const line of x.changes) {
      const li = h('li', null, line);
      items.append(li);
      // An input or base that changed: list the paths that differ between its layers.
      const parsed = /(input `[^`]+`|base) changed `?([0-9a-f]{8,})…?`?→`?([0-9a-f]{8,})…?`?/.exec(line);
      if (parsed) {
        const [, , a, b] = parsed;
        const sub = h('ul', { class: 'paths' }, h('li', { class: 'muted' }, 'paths changed…'));
        li.append(sub);
        api.diff(a, b).then((d) => {
          fill(sub, d.changes.slice(0, 200).map((c) => h('li', null, h('span', { class: `chg chg-${c.change}` }, c.change), ' ', c.path)),
            d.changes.length > 200 ? h('li', { class: 'muted' }, `and ${d.changes.length - 200} more`) : null,
            d.changes.length ? null : h('li', { class: 'muted' }, 'no path differs'));
        }).catch((e) => fill(sub, h('li', { class: 'muted' }, `cannot diff the layers: ${msg(e)}`)));
      }
    }
  }).catch((e) => {
    fill(box, h('p', { class: 'muted' }, e instanceof ApiError && e.status === 404 ? e.message : `Cannot explain: ${msg(e)}`));
  });
}

function filesTab(ctx: TaskCtx, rec: TaskRecord | undefined, root: HTMLElement, signal: AbortSignal): void {
  const layer = rec?.output;
  if (!layer) { root.append(h('p', { class: 'muted' }, 'This task has no output layer (yet).')); return; }
  root.append(fileBrowser(layer, `${ctx.label.replace(/[^A-Za-z0-9._-]+/g, '_')}`, signal));
}

/** A layer's files: a listing with a breadcrumb, and a capped text viewer. */
export function fileBrowser(layer: string, name: string, signal: AbortSignal): HTMLElement {
  const crumbs = h('div', { class: 'crumbs' });
  const list = h('div', { class: 'file-list', 'data-testid': 'file-list' });
  const viewer = h('div', { class: 'viewer', 'data-testid': 'viewer' });
  const el = h('div', { class: 'browser' },
    h('div', { class: 'toolbar' }, h('code', { class: 'muted' }, shortDigest(layer)), h('span', { class: 'spacer' }),
      h('button', { class: 'small', onclick: (() => void download(api.archiveUrl(layer), `${name}-${layer.slice(0, 12)}.tar.zst`)) as EventListener }, 'Download layer (.tar.zst)')),
    crumbs, h('div', { class: 'browser-split' }, list, viewer));
  const open = async (dir: string) => {
    fill(crumbs, h('a', { href: '#', onclick: ((e: Event) => { e.preventDefault(); void open(''); }) as EventListener }, '/'),
      dir.split('/').filter(Boolean).map((part, i, all) => [' ', h('a', { href: '#', onclick: ((e: Event) => { e.preventDefault(); void open(all.slice(0, i + 1).join('/')); }) as EventListener }, part), ' /']));
    try {
      const l = await api.tree(layer, dir);
      if (signal.aborted) return;
      const rows = [...l.entries].sort((a, b) => (a.kind === 'dir' ? 0 : 1) - (b.kind === 'dir' ? 0 : 1) || (a.name < b.name ? -1 : 1));
      fill(list, h('table', { class: 'files' }, h('tbody', null, rows.length ? rows.map((e) => {
        const path = dir ? `${dir}/${e.name}` : e.name;
        const link = h('a', { href: '#', class: `f-${e.kind}`, 'data-path': path }, e.kind === 'dir' ? `${e.name}/` : e.name);
        link.addEventListener('click', (ev) => {
          ev.preventDefault();
          if (e.kind === 'dir') void open(path);
          else if (e.kind === 'file') void showFile(layer, path, e.size ?? 0, viewer);
          else fill(viewer, h('p', null, 'symlink → ', h('code', null, e.target ?? '')));
        });
        return h('tr', null, h('td', null, link, e.executable ? h('span', { class: 'muted' }, ' *') : null),
          h('td', { class: 'num' }, e.kind === 'file' ? bytes(e.size) : e.kind === 'symlink' ? '→ ' + (e.target ?? '') : ''));
      }) : h('tr', null, h('td', { class: 'muted' }, 'empty directory')))),
      l.truncated ? h('p', { class: 'muted' }, 'The listing stopped at its limit.') : null);
    } catch (e) {
      fill(list, h('p', { class: 'muted' }, `Cannot list: ${msg(e)}`));
    }
  };
  void open('');
  return el;
}

/** Shows a file as text (the first TEXT_CAP bytes), never as markup. */
export async function showFile(layer: string, path: string, size: number, viewer: HTMLElement): Promise<void> {
  const base = path.split('/').pop() ?? 'file';
  const dl = h('button', { class: 'small', onclick: (() => void download(api.fileUrl(layer, path), base)) as EventListener }, 'Download');
  fill(viewer, h('div', { class: 'toolbar' }, h('code', null, path), h('span', { class: 'muted' }, ` ${bytes(size)}`), h('span', { class: 'spacer' }), dl),
    h('p', { class: 'muted' }, 'Loading…'));
  try {
    const res = await fetch(api.fileUrl(layer, path), { headers: headers(size > TEXT_CAP ? { Range: `bytes=0-${TEXT_CAP - 1}` } : {}) });
    if (!res.ok && res.status !== 206) throw new Error(`HTTP ${res.status}`);
    const buf = new Uint8Array(await res.arrayBuffer());
    const binary = buf.subarray(0, 8192).includes(0);
    viewer.lastElementChild?.remove();
    if (binary) {
      viewer.append(h('p', { class: 'muted' }, `A binary file (${bytes(size)}); download it to look inside.`));
      return;
    }
    const text = new TextDecoder('utf-8', { fatal: false }).decode(buf);
    if (size > TEXT_CAP) viewer.append(h('p', { class: 'banner warn' }, `Showing the first ${bytes(TEXT_CAP)} of ${bytes(size)}; download the file for all of it.`));
    viewer.append(h('pre', { class: 'pre file-text', 'data-testid': 'file-text' }, text));
  } catch (e) {
    viewer.lastElementChild?.remove();
    viewer.append(h('p', { class: 'muted' }, `Cannot read: ${msg(e)}`));
  }
}

/** The most recent earlier run of the workspace where this task had another output. */
async function previousOutput(ctx: TaskCtx, current: string, signal: AbortSignal): Promise<{ run: string; output: string; same: string[] } | null> {
  if (!ctx.workspace) return null;
  let cursor: string | undefined = ctx.run.id;
  const same: string[] = [];
  for (let pages = 0; pages < 4 && cursor; pages++) {
    const page = await api.runs({ workspace: ctx.workspace, cursor, limit: 25 });
    for (const r of page.runs) {
      if (signal.aborted) return null;
      const rec = await api.run(r.id);
      const t = rec.tasks[ctx.label];
      if (!t?.output) continue;
      if (t.output !== current) return { run: r.id, output: t.output, same };
      same.push(r.id);
    }
    cursor = page.next ?? undefined;
  }
  return null;
}

function diffTab(ctx: TaskCtx, rec: TaskRecord | undefined, root: HTMLElement, signal: AbortSignal): void {
  const out = rec?.output;
  if (!out) { root.append(h('p', { class: 'muted' }, 'This task has no output layer (yet).')); return; }
  const box = h('div', { 'data-testid': 'diff' }, h('p', { class: 'muted' }, 'Looking for this task\u2019s previous output in earlier runs…'));
  root.append(box);
  previousOutput(ctx, out, signal).then(async (prev) => {
    if (signal.aborted) return;
    if (!prev) { fill(box, h('p', { class: 'muted' }, 'No earlier run of this workspace gave this task another output.')); return; }
    const d = await api.diff(prev.output, out);
    const detail = h('div', { class: 'file-diff', 'data-testid': 'file-diff' });
    fill(box,
      h('p', null, `Against run `, h('a', { href: `/runs/${encodeURIComponent(prev.run)}?task=${encodeURIComponent(ctx.label)}`, 'data-link': '' }, prev.run),
        ` (${shortDigest(prev.output)} → ${shortDigest(out)})`, prev.same.length ? h('span', { class: 'muted' }, `; runs in between had the same output`) : null),
      d.changes.length ? h('ul', { class: 'changes', 'data-testid': 'diff-changes' }, d.changes.map((c) => {
        const a = h('a', { href: '#', 'data-path': c.path }, c.path);
        a.addEventListener('click', (e) => { e.preventDefault(); void fileDiff(prev.output, out, c.path, c.change, detail); });
        return h('li', null, h('span', { class: `chg chg-${c.change}` }, c.change), ' ', c.new_kind === 'file' || c.old_kind === 'file' ? a : c.path);
      })) : h('p', null, 'The outputs are equal.'),
      detail);
  }).catch((e) => fill(box, h('p', { class: 'muted' }, `Cannot diff: ${msg(e)}`)));
}

async function text(layer: string, path: string): Promise<string> {
  const res = await fetch(api.fileUrl(layer, path), { headers: headers({ Range: `bytes=0-${TEXT_CAP - 1}` }) });
  if (res.status === 404) return '';
  if (!res.ok) throw new Error(`HTTP ${res.status}`);
  return new TextDecoder().decode(await res.arrayBuffer());
}

async function fileDiff(a: string, b: string, path: string, change: string, el: HTMLElement): Promise<void> {
  fill(el, h('p', { class: 'muted' }, 'Loading both sides…'));
  try {
    const [x, y] = await Promise.all([change === 'added' ? '' : text(a, path), change === 'removed' ? '' : text(b, path)]);
    const lines = lineDiff(x, y);
    if (!lines) { fill(el, h('p', { class: 'muted' }, 'Too large to diff here; download both sides.')); return; }
    fill(el, h('h3', null, path), h('pre', { class: 'pre diff-lines' }, hunks(lines).map((l) =>
      l === null ? h('div', { class: 'gap' }, '…') : h('div', { class: `dl dl-${l.kind === '+' ? 'add' : l.kind === '-' ? 'del' : 'eq'}` }, `${l.kind} ${l.text}`))));
  } catch (e) {
    fill(el, h('p', { class: 'muted' }, `Cannot diff: ${msg(e)}`));
  }
}

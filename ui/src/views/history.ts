// History: runs (of a workspace, or all) with durations, cache-hit ratio
// and a trend; and the comparison of two runs, task by task.

import { api, type LayerDiff, type RunRecord, type RunSummary } from '../api';
import { h, s, fill } from '../dom';
import { onFeed } from '../feed';
import { navigate } from '../nav';
import { dur, targetsText, when } from '../util';

export function hitRatio(r: { cached: number; executed: number }): number | null {
  const n = r.cached + r.executed;
  return n ? r.cached / n : null;
}

function pct(v: number | null): string {
  return v === null ? '–' : `${Math.round(v * 100)}%`;
}

/** Durations (bars, by state) and cache-hit ratio (line) of runs, oldest left. */
function trend(runs: RunSummary[]): SVGSVGElement {
  const rs = [...runs].reverse().slice(-60);
  const W = 900, H = 140, pad = 24;
  const max = Math.max(1, ...rs.map((r) => r.duration_ms));
  const bw = Math.min(28, (W - pad * 2) / Math.max(1, rs.length));
  const bars = rs.map((r, i) => {
    const bh = Math.max(2, ((H - pad * 2) * r.duration_ms) / max);
    const bar = s('rect', { x: pad + i * bw + 1, y: H - pad - bh, width: Math.max(1, bw - 2), height: bh, class: `bar st-${r.state}` },
      s('title', null, `${r.id}\n${r.state} · ${dur(r.duration_ms)} · hits ${pct(hitRatio(r))}`));
    bar.addEventListener('click', () => navigate(`/runs/${encodeURIComponent(r.id)}`));
    return bar;
  });
  const pts = rs.map((r, i) => [r, i] as const).filter(([r]) => hitRatio(r) !== null)
    .map(([r, i]) => `${pad + i * bw + bw / 2},${H - pad - (H - pad * 2) * hitRatio(r)!}`);
  return s('svg', { class: 'trend', viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'xMinYMid meet', 'data-testid': 'trend' },
    s('text', { x: pad, y: 14, class: 'axis' }, `duration (max ${dur(max)}) · line: cache-hit ratio`),
    s('line', { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, class: 'axis-line' }),
    ...bars,
    pts.length > 1 ? s('polyline', { points: pts.join(' '), class: 'hit-line' }) : null);
}

export function historyView(root: HTMLElement, _p: Record<string, string>, query: URLSearchParams): () => void {
  const ws = query.get('workspace') ?? '';
  const state = query.get('state') ?? '';
  let runs: RunSummary[] = [];
  let next: string | null = null;
  const picked: string[] = [];
  const body = h('div');
  const filters = h('form', { class: 'filters' });
  const wsSel = h('select', { name: 'workspace', 'aria-label': 'Workspace' }, h('option', { value: '' }, 'all workspaces'));
  const stSel = h('select', { name: 'state', 'aria-label': 'State' }, ['', 'succeeded', 'failed', 'cancelled', 'running', 'queued', 'interrupted'].map((v) =>
    h('option', { value: v, selected: v === state }, v || 'any state')));
  filters.append(wsSel, stSel);
  filters.addEventListener('change', () => {
    const q = new URLSearchParams();
    if (wsSel.value) q.set('workspace', wsSel.value);
    if (stSel.value) q.set('state', stSel.value);
    navigate(`/runs${q.toString() ? '?' + q : ''}`);
  });
  const compare = h('button', { disabled: true, 'data-testid': 'compare' }, 'Compare the two picked runs');
  compare.addEventListener('click', () => navigate(`/compare/${encodeURIComponent(picked[0])}/${encodeURIComponent(picked[1])}`));
  root.append(h('div', { class: 'view-head' }, h('h1', null, ws ? `Runs of ${ws}` : 'Runs'), filters, h('span', { class: 'spacer' }), compare), body);
  api.workspaces().then((list) => {
    for (const w of list) wsSel.append(h('option', { value: w.name, selected: w.name === ws }, w.name));
  }).catch(() => {});

  const load = async (more = false) => {
    try {
      const page = await api.runs({ workspace: ws || undefined, state: state || undefined, limit: 50, cursor: more ? next ?? undefined : undefined });
      runs = more ? [...runs, ...page.runs] : page.runs;
      next = page.next;
      draw();
    } catch (e) {
      fill(body, h('div', { class: 'banner error' }, e instanceof Error ? e.message : String(e)));
    }
  };
  const draw = () => {
    const finished = runs.filter((r) => r.duration_ms > 0);
    const avg = finished.length ? finished.reduce((a, r) => a + r.duration_ms, 0) / finished.length : 0;
    fill(body,
      runs.length ? trend(runs) : null,
      h('p', { class: 'muted' }, `${runs.length} runs shown · mean duration ${dur(avg)} · pick two to compare`),
      h('table', { class: 'runs', 'data-testid': 'runs-table' },
        h('thead', null, h('tr', null, ['', 'run', 'state', 'workspace', 'targets', 'trigger', 'started', 'duration', 'tasks', 'ran', 'cached', 'hit ratio', 'failed'].map((c) => h('th', null, c)))),
        h('tbody', null, runs.map((r) => {
          const box = h('input', { type: 'checkbox', 'aria-label': `pick ${r.id}`, checked: picked.includes(r.id) });
          box.addEventListener('change', () => {
            if (box.checked) { picked.push(r.id); if (picked.length > 2) picked.shift(); } else picked.splice(picked.indexOf(r.id), 1);
            compare.disabled = picked.length !== 2;
            draw();
          });
          return h('tr', { 'data-run': r.id },
            h('td', null, box),
            h('td', null, h('a', { href: `/runs/${encodeURIComponent(r.id)}`, 'data-link': '' }, r.id)),
            h('td', null, h('span', { class: `pill st-${r.state}` }, r.state)),
            h('td', null, r.workspace ?? 'inline'),
            h('td', { title: r.targets.join(' ') }, targetsText(r.targets)),
            h('td', null, r.trigger ? `${r.trigger.kind}${r.trigger.by ? ' · ' + r.trigger.by : ''}` : 'cli'),
            h('td', null, when(r.started_ms)),
            h('td', { class: 'num' }, dur(r.duration_ms)),
            h('td', { class: 'num' }, r.tasks), h('td', { class: 'num' }, r.executed), h('td', { class: 'num' }, r.cached),
            h('td', { class: 'num' }, pct(hitRatio(r))), h('td', { class: 'num' }, r.failed));
        }))),
      next ? h('button', { onclick: (() => void load(true)) as EventListener }, 'Older runs') : null);
  };
  // New and finished runs arrive on the feed: refetch the first page then.
  const off = onFeed((e) => { if (e.kind === 'run_queued' || e.kind === 'run_finished') void load(); }, () => void load());
  void load();
  return off;
}

export function compareView(root: HTMLElement, p: Record<string, string>): void {
  const body = h('div', null, h('p', { class: 'muted' }, 'Loading both runs…'));
  root.append(h('div', { class: 'view-head' }, h('h1', null, 'Compare ', h('code', null, p.a), ' and ', h('code', null, p.b))), body);
  Promise.all([api.run(p.a), api.run(p.b)]).then(([a, b]) => {
    const [old, neu] = a.started_ms <= b.started_ms ? [a, b] : [b, a];
    const labels = [...new Set([...Object.keys(old.tasks), ...Object.keys(neu.tasks)])].sort();
    let onlyDiff = true;
    const table = h('tbody');
    const draw = () => {
      fill(table, labels.map((l) => {
        const x = old.tasks[l], y = neu.tasks[l];
        const sameKey = x?.key && y?.key && x.key === y.key;
        const sameOut = x?.output && y?.output && x.output === y.output;
        const differs = !x || !y || x.state !== y.state || !sameKey || !sameOut;
        if (onlyDiff && !differs) return null;
        const why: (string | Node)[] = [];
        if (!x) why.push('only in the newer run'); else if (!y) why.push('only in the older run');
        else {
          if (x.state !== y.state) why.push(`state ${x.state} → ${y.state}`);
          if (!sameKey) why.push('action key changed');
          if (!sameOut && x.output && y.output) {
            const link = h('a', { href: '#' }, 'output changed');
            const cell = h('div', { class: 'paths' });
            link.addEventListener('click', (e) => {
              e.preventDefault();
              api.diff(x.output!, y.output!).then((d: LayerDiff) => fill(cell, h('ul', null, d.changes.slice(0, 50).map((c) =>
                h('li', null, h('span', { class: `chg chg-${c.change}` }, c.change), ' ', c.path)))))
                .catch((err) => fill(cell, String(err.message ?? err)));
            });
            why.push(link, cell);
          }
          if (y.cached && !x.cached) why.push('now from the cache');
        }
        const st = (r: RunRecord, t: typeof x) => t ? h('a', { href: `/runs/${encodeURIComponent(r.id)}?task=${encodeURIComponent(l)}`, 'data-link': '', class: `pill st-${t.cached ? 'cached' : t.state}` }, t.cached ? 'cached' : t.state) : '–';
        return h('tr', { 'data-label': l }, h('td', null, l), h('td', null, st(old, x)), h('td', null, st(neu, y)),
          h('td', { class: 'num' }, x ? dur(x.duration_ms) : '–'), h('td', { class: 'num' }, y ? dur(y.duration_ms) : '–'),
          h('td', null, why.length ? why.map((w, i) => [i ? ' · ' : '', w]) : 'same'));
      }));
    };
    const toggle = h('label', null, h('input', { type: 'checkbox', checked: true, onchange: ((e: Event) => { onlyDiff = (e.target as HTMLInputElement).checked; draw(); }) as EventListener }), ' only tasks that differ');
    fill(body,
      h('p', null, `Older: ${old.id} (${old.state}, ${dur(old.duration_ms)}) · newer: ${neu.id} (${neu.state}, ${dur(neu.duration_ms)})`), toggle,
      h('table', { class: 'runs', 'data-testid': 'compare-table' },
        h('thead', null, h('tr', null, ['task', 'older', 'newer', 'older took', 'newer took', 'why they differ'].map((c) => h('th', null, c)))), table));
    draw();
  }).catch((e) => fill(body, h('div', { class: 'banner error' }, e instanceof Error ? e.message : String(e))));
}

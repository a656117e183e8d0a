// The wall: every workspace with its latest run, what runs now (ticking),
// the queue and the last failures. Fetched once, then kept current by the
// global feed alone; a reconnect (server restart) refetches.

import { api, type RunSummary, type State, type Workspace } from '../api';
import { h, fill } from '../dom';
import { onFeed, onFeedStatus, type FeedEvent } from '../feed';
import { dur, ago, everySecond, isFinal, serverNow, targetsText } from '../util';

interface LiveRun {
  id: string;
  workspace: string | null;
  state: State;
  started_ms: number;
  duration_ms: number;
  targets: string[];
  tasks: number; // total, when known
  done: number;
  failedTasks: string[];
  running: Map<string, number>; // label -> started (server clock: the event's at_ms)
}

export function wallView(root: HTMLElement, params: Record<string, string>): () => void {
  const tv = params.tv === '1';
  let workspaces: Workspace[] = [];
  const runs = new Map<string, LiveRun>();
  let error = '';
  let down = false;

  const body = h('div', { class: 'wall', 'data-testid': 'wall' });
  const fs = h('button', { class: 'small', onclick: (() => void document.documentElement.requestFullscreen?.()) as EventListener }, 'Full screen');
  root.append(tv ? body : h('div', null, h('div', { class: 'view-head' }, h('h1', null, 'Wall'),
    h('span', { class: 'muted' }, 'Live from the server\u2019s event feed. '),
    h('a', { href: '/tv', 'data-link': '' }, 'TV mode'), ' ', fs), body));

  const fromSummary = (r: RunSummary): LiveRun => ({
    id: r.id, workspace: r.workspace, state: r.state, started_ms: r.started_ms, duration_ms: r.duration_ms,
    targets: r.targets, tasks: r.tasks, done: r.tasks, failedTasks: [], running: runs.get(r.id)?.running ?? new Map(),
  });

  async function resync(): Promise<void> {
    try {
      const [ws, page] = await Promise.all([api.workspaces(), api.runs({ limit: 200 })]);
      workspaces = ws;
      const seen = new Set<string>();
      for (const r of page.runs) {
        seen.add(r.id);
        const lr = fromSummary(r);
        runs.set(r.id, lr);
      }
      for (const id of [...runs.keys()]) if (!seen.has(id)) runs.delete(id);
      error = '';
      draw();
      // The names of failed tasks, for the few latest failures.
      const failed = [...runs.values()].filter((r) => r.state === 'failed').sort((a, b) => b.started_ms - a.started_ms).slice(0, 6);
      await Promise.all(failed.map(async (r) => {
        try {
          const rec = await api.run(r.id);
          r.failedTasks = Object.entries(rec.tasks).filter(([, t]) => t.state === 'failed').map(([l]) => l);
        } catch { /* gone */ }
      }));
      // Runs under way: what has finished so far.
      await Promise.all([...runs.values()].filter((r) => !isFinal(r.state)).map(async (r) => {
        try {
          const rec = await api.run(r.id);
          r.done = Object.keys(rec.tasks).length;
        } catch { /* gone */ }
      }));
    } catch (e) {
      error = e instanceof Error ? e.message : String(e);
    }
    draw();
  }

  function onEvent(e: FeedEvent): void {
    let r = runs.get(e.run);
    const d = e.data;
    const at = typeof d.at_ms === 'number' ? d.at_ms : serverNow();
    if (!r) {
      r = { id: e.run, workspace: d.workspace ?? null, state: 'queued', started_ms: at, duration_ms: 0, targets: d.targets ?? [],
        tasks: 0, done: 0, failedTasks: [], running: new Map() };
      runs.set(e.run, r);
      if (e.kind !== 'run_queued') {
        // Seen mid-way: learn its workspace once.
        api.run(e.run).then((rec) => { r!.workspace = rec.workspace ?? null; r!.targets = rec.targets; draw(); }).catch(() => {});
      }
    }
    switch (e.kind) {
      case 'run_queued': r.state = 'queued'; break;
      case 'run_started': r.state = 'running'; r.tasks = d.tasks ?? r.tasks; r.started_ms = at; break;
      case 'task_started': r.state = 'running'; r.running.set(d.label, at); break;
      case 'task_finished':
        r.running.delete(d.label);
        r.done++;
        if (d.state === 'failed') r.failedTasks.push(d.label);
        break;
      case 'run_finished':
        r.state = d.state; r.duration_ms = d.duration_ms ?? r.duration_ms; r.running.clear();
        if (r.workspace) {
          const w = workspaces.find((w) => w.name === r!.workspace);
          if (w) { w.latest_run = r.id; w.latest_state = d.state; }
        }
        break;
    }
    if (r.workspace && (e.kind === 'run_queued' || e.kind === 'run_started')) {
      const w = workspaces.find((w) => w.name === r!.workspace);
      if (w) { w.latest_run = r.id; w.latest_state = r.state; }
    }
    draw();
  }

  function elapsed(r: LiveRun): number {
    return r.state === 'running' || r.state === 'queued' ? Math.max(0, serverNow() - r.started_ms) : r.duration_ms;
  }

  function draw(): void {
    const all = [...runs.values()].sort((a, b) => (a.id < b.id ? 1 : -1));
    const running = all.filter((r) => r.state === 'running');
    const queued = all.filter((r) => r.state === 'queued').reverse();
    const failures = all.filter((r) => r.state === 'failed' || r.state === 'interrupted').slice(0, 6);
    const latest = (ws: string) => all.find((r) => r.workspace === ws);
    fill(body,
      down ? h('div', { class: 'banner warn' }, 'Connection to the server lost; reconnecting by itself…') : null,
      error ? h('div', { class: 'banner error' }, error) : null,
      h('section', { class: 'tiles' }, workspaces.map((w) => {
        const r = latest(w.name);
        const state = r?.state ?? w.latest_state ?? 'none';
        return h('a', { class: `tile st-${state}`, href: `/workspaces/${encodeURIComponent(w.name)}`, 'data-link': '', 'data-testid': `tile-${w.name}` },
          h('div', { class: 'tile-name' }, w.name),
          h('div', { class: 'tile-state', 'data-testid': 'tile-state' }, state),
          r ? h('div', { class: 'tile-meta' },
            state === 'running' ? `${r.done}${r.tasks ? '/' + r.tasks : ''} tasks · ${dur(elapsed(r))}` : `${dur(r.duration_ms)} · ${ago(r.started_ms)}`) :
            h('div', { class: 'tile-meta' }, w.latest_run ? w.latest_run : 'no runs yet'));
      })),
      h('div', { class: 'wall-cols' },
        h('section', { class: 'panel' }, h('h2', null, `Running now (${running.length})`),
          running.length ? running.map((r) => h('div', { class: 'live-run', 'data-testid': 'running-run' },
            h('a', { href: `/runs/${encodeURIComponent(r.id)}`, 'data-link': '', class: 'run-id' }, r.workspace ?? 'inline', ' · ', r.id),
            h('span', { class: 'elapsed' }, dur(elapsed(r))),
            h('ul', { class: 'running-tasks' }, [...r.running].slice(0, 8).map(([l, t]) =>
              h('li', null, h('span', { class: 'dot st-running' }), l, ' ', h('span', { class: 'muted' }, dur(Math.max(0, serverNow() - t))))),
              r.running.size > 8 ? h('li', { class: 'muted' }, `and ${r.running.size - 8} more`) : null)))
            : h('p', { class: 'muted' }, 'Nothing is running.')),
        h('section', { class: 'panel' }, h('h2', null, `Queue (${queued.length})`),
          queued.length ? h('ol', null, queued.map((r) => h('li', null,
            h('a', { href: `/runs/${encodeURIComponent(r.id)}`, 'data-link': '' }, r.workspace ?? 'inline', ' · ', targetsText(r.targets)),
            ' ', h('span', { class: 'muted' }, `waiting ${dur(elapsed(r))}`)))) : h('p', { class: 'muted' }, 'The queue is empty.')),
        h('section', { class: 'panel' }, h('h2', null, 'Last failures'),
          failures.length ? h('ul', { class: 'failures' }, failures.map((r) => h('li', null,
            h('a', { href: `/runs/${encodeURIComponent(r.id)}`, 'data-link': '', class: `st-text-${r.state}` }, r.workspace ?? 'inline', ' · ', r.id),
            ' ', h('span', { class: 'muted' }, ago(r.started_ms)),
            r.failedTasks.length ? h('div', { class: 'failed-tasks' }, r.failedTasks.slice(0, 4).join(', ')) : null)))
            : h('p', { class: 'muted' }, 'No recent failures.'))));
  }

  const offFeed = onFeed(onEvent, () => void resync());
  const offStatus = onFeedStatus((up) => { if (down !== !up) { down = !up; draw(); } });
  const offTick = everySecond(() => { if ([...runs.values()].some((r) => !isFinal(r.state))) draw(); });
  draw();
  void resync();
  return () => { offFeed(); offStatus(); offTick(); };
}

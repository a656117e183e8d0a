// A run: its whole graph from the model before anything runs, live node
// states from the run's own event stream, predictions, the task panel, and
// the waterfall with the critical path and the analysis in words.

import { api, ApiError, type Analysis, type Graph, type RunRecord } from '../api';
import { canWrite, onAccess } from '../auth';
import { h, fill } from '../dom';
import { GraphView, type NodeStatus } from '../graph';
import { cone, graphNodes } from '../model';
import { Sse } from '../sse';
import { dur, everySecond, isFinal, observeServerTime, serverNow, targetsText, when } from '../util';
import { Waterfall, type WfTask } from '../waterfall';
import { analysisPanel } from './analysis';
import { navigate } from '../nav';
import { taskPanel } from './task';

export function runView(root: HTMLElement, params: Record<string, string>, query: URLSearchParams): () => void {
  const id = params.id;
  const cleanups: (() => void)[] = [];
  const head = h('div', { class: 'view-head' }, h('h1', null, 'Run ', h('code', null, id)));
  const notes = h('div', { class: 'notes' });
  const split = h('div', { class: 'run-split' });
  root.append(head, notes, split);
  let record: RunRecord | null = null;
  let graph: Graph | null = null;
  let view: GraphView | null = null;
  const running = new Map<string, number>(); // label → its start (server clock: the event's at_ms)
  const liveState = new Map<string, string>();
  let predictions: Record<string, { will_cache: boolean; reason: string | null }> = {};
  let panel: { el: HTMLElement; close: () => void } | null = null;
  let selected = query.get('task');
  let tab = query.get('tab') ?? 'log';
  let mode: 'graph' | 'waterfall' = query.get('view') === 'waterfall' ? 'waterfall' : 'graph';
  let wf: Waterfall | null = null;
  let analysis: Analysis | null = null;
  let analysisFor = '';
  const analysisBox = h('div', { class: 'analysis-box' });
  const wfBox = h('div', { class: 'wf-box' }, analysisBox);

  const status = (label: string): NodeStatus => {
    const t = record?.tasks[label];
    const p = predictions[label];
    if (t) {
      const state = t.cached ? 'cached' : t.reused ? 'kept' : t.state;
      const badge = t.cached ? 'cached' : t.reused ? 'kept' : t.state === 'succeeded' && p ? (p.will_cache ? 'predicted: cached' : 'ran as predicted') : null;
      return { state, detail: `${t.state}${t.duration_ms ? ' · ' + dur(t.duration_ms) : ''}`, badge, badgeKind: t.cached || t.reused ? 'hit' : badge ? 'info' : null };
    }
    const live = liveState.get(label);
    if (live === 'running') {
      const since = running.get(label);
      return { state: 'running', detail: `running ${since ? dur(Math.max(0, serverNow() - since)) : ''}`, badge: null, badgeKind: null };
    }
    const state = record && isFinal(record.state) ? 'cancelled' : record?.state === 'queued' ? 'queued' : 'pending';
    if (p) {
      return { state, detail: state, badge: p.will_cache ? 'will be cached' : `will run: ${p.reason ?? 'not cached'}`, badgeKind: p.will_cache ? 'hit' : 'run' };
    }
    return { state, detail: state, badge: null, badgeKind: null };
  };

  const paintAll = () => {
    if (!view || !record) return;
    for (const l of labels()) view.setStatus(l, status(l));
  };

  const labels = (): string[] => {
    const set = graph ? cone(graph, record?.targets ?? []) : new Set<string>();
    for (const l of Object.keys(record?.tasks ?? {})) set.add(l);
    return [...set];
  };

  const drawHead = () => {
    if (!record) return;
    const r = record;
    const counts = { done: Object.keys(r.tasks).length, cached: Object.values(r.tasks).filter((t) => t.cached).length };
    const elapsed = isFinal(r.state) ? r.duration_ms : Math.max(0, serverNow() - r.started_ms);
    const actions = h('span', { class: 'actions' });
    if (canWrite()) {
      if (!isFinal(r.state)) {
        actions.append(h('button', { class: 'danger', 'data-testid': 'cancel', onclick: (async () => {
          try { await api.cancel(r.id); } catch (e) { note(e); }
        }) as EventListener }, 'Cancel run'));
      } else if (r.workspace && r.state !== 'succeeded') {
        actions.append(h('button', { 'data-testid': 'rerun', onclick: (async () => {
          try { const a = await api.rerun(r.id); navigate(`/runs/${encodeURIComponent(a.id)}`); } catch (e) { note(e); }
        }) as EventListener }, 'Rerun what failed'));
      }
    }
    fill(head,
      h('h1', null, 'Run ', h('code', null, r.id)),
      h('span', { class: `pill st-${r.state}`, 'data-testid': 'run-state' }, r.state),
      h('span', { class: 'muted' }, ` ${r.workspace ?? 'inline pipeline'} · ${targetsText(r.targets)} · started ${when(r.started_ms)} · ${dur(elapsed)} · ${counts.done} done, ${counts.cached} cached`),
      r.trigger ? h('span', { class: 'muted' }, ` · by ${r.trigger.kind}${r.trigger.by ? ' (' + r.trigger.by + ')' : ''}${r.trigger.detail ? ' ' + r.trigger.detail : ''}`) : null,
      r.rerun_of ? h('span', { class: 'muted' }, ' · rerun of ', h('a', { href: `/runs/${encodeURIComponent(r.rerun_of)}`, 'data-link': '' }, r.rerun_of)) : null,
      h('span', { class: 'spacer' }),
      h('span', { class: 'seg', role: 'tablist' },
        h('button', { class: `small toggle${mode === 'graph' ? ' on' : ''}`, role: 'tab', 'aria-selected': mode === 'graph' ? 'true' : 'false', 'data-testid': 'view-graph', onclick: (() => show('graph')) as EventListener }, 'Graph'),
        h('button', { class: `small toggle${mode === 'waterfall' ? ' on' : ''}`, role: 'tab', 'aria-selected': mode === 'waterfall' ? 'true' : 'false', 'data-testid': 'view-waterfall', onclick: (() => show('waterfall')) as EventListener }, 'Waterfall')),
      ' ',
      r.workspace ? h('a', { href: `/runs?workspace=${encodeURIComponent(r.workspace)}`, 'data-link': '' }, 'History') : null,
      ' ', actions);
  };

  const note = (e: unknown) => notes.append(h('div', { class: 'banner error' }, e instanceof Error ? e.message : String(e)));

  const url = () => {
    const q = new URLSearchParams();
    if (mode === 'waterfall') q.set('view', 'waterfall');
    if (selected) q.set('task', selected);
    if (selected && tab !== 'log') q.set('tab', tab);
    return `/runs/${encodeURIComponent(id)}${q.toString() ? '?' + q : ''}`;
  };

  // The waterfall's rows: the record's tasks, the ones running now, the rest not started.
  const wfTasks = (): { tasks: WfTask[]; span: number; now: number | null } => {
    const r = record!;
    const live = !isFinal(r.state);
    const now = live ? Math.max(0, serverNow() - r.started_ms) : null;
    let end = 0;
    const tasks = labels().map((label): WfTask => {
      const t = r.tasks[label];
      if (t) {
        const start = t.started_ms ? Math.max(0, t.started_ms - r.started_ms) : null;
        if (start !== null) end = Math.max(end, start + t.queued_ms + t.duration_ms);
        return { label, start, queued: t.queued_ms, duration: t.duration_ms, state: t.cached ? 'cached' : t.reused ? 'kept' : t.state };
      }
      const since = running.get(label);
      if (since !== undefined) return { label, start: Math.max(0, since - r.started_ms), queued: 0, duration: null, state: 'running' };
      return { label, start: null, queued: 0, duration: null, state: live ? 'pending' : 'cancelled' };
    });
    return { tasks, span: Math.max(end, now ?? r.duration_ms), now };
  };

  const paintWf = () => {
    if (!wf || !record || mode !== 'waterfall') return;
    const d = wfTasks();
    wf.update(d.tasks, d.span, d.now, analysis ? analysis.critical_path.map((s) => s.label) : null);
  };

  const loadAnalysis = () => {
    if (!record || !isFinal(record.state) || analysisFor === record.state) return;
    analysisFor = record.state;
    api.analysis(id).then((a) => {
      analysis = a;
      fill(analysisBox, analysisPanel(a, (l) => select(l)));
      view?.mark(a.critical_path.map((s) => s.label));
      paintWf();
    }).catch((e) => fill(analysisBox, h('div', { class: 'banner info' }, `No analysis of this run: ${e instanceof Error ? e.message : String(e)}`)));
  };

  const show = (m: 'graph' | 'waterfall') => {
    mode = m;
    history.replaceState(null, '', url());
    const left = m === 'waterfall' ? wfBox : view?.el;
    if (m === 'waterfall' && !wf) {
      wf = new Waterfall({ onSelect: (l) => select(l) });
      wf.select(selected);
      wfBox.append(wf.el);
    }
    view?.el.remove();
    wfBox.remove();
    if (left) split.prepend(left);
    if (record && !isFinal(record.state) && m === 'waterfall') {
      fill(analysisBox, h('p', { class: 'muted analysis-wait' }, 'The critical path and the analysis come when the run has finished.'));
    }
    paintWf();
    if (m === 'graph') requestAnimationFrame(() => view?.fit());
    drawHead();
  };

  const select = (label: string | null, t = tab) => {
    selected = label; tab = t;
    history.replaceState(null, '', url());
    panel?.close();
    panel?.el.remove();
    panel = null;
    view?.select(label);
    wf?.select(label);
    if (!label || !record) { split.classList.remove('with-panel'); return; }
    panel = taskPanel({ run: record, label, workspace: record.workspace ?? null, live: liveState.has(label) ? { state: liveState.get(label)!, started: running.get(label) ?? null } : null },
      t, (nt) => select(label, nt));
    panel.el.prepend(h('button', { class: 'close small', title: 'Close', onclick: (() => select(null)) as EventListener }, '×'));
    split.classList.add('with-panel');
    split.append(panel.el);
  };

  const onEvent = (kind: string, d: any) => {
    if (!record) return;
    observeServerTime(d.at_ms);
    const at = typeof d.at_ms === 'number' ? d.at_ms : serverNow();
    switch (kind) {
      case 'run_started': record.state = 'running'; break;
      case 'task_started': liveState.set(d.label, 'running'); running.set(d.label, at); break;
      case 'task_finished': {
        liveState.set(d.label, d.state);
        const since = running.get(d.label);
        running.delete(d.label);
        // The event has what the node shows; the record is refetched at the end.
        const took = d.duration_ms ?? 0;
        record.tasks[d.label] = {
          ...(record.tasks[d.label] ?? { key: null, log: null, reused: false, queued_ms: 0, attempts: 1 }),
          started_ms: since ?? Math.max(record.started_ms, at - took),
          queued_ms: since !== undefined ? Math.max(0, at - since - took) : 0,
          state: d.state, cached: !!d.cached, output: d.output ?? null, duration_ms: took,
          exit_code: d.exit_code ?? null, error: d.error ?? null,
        };
        const wasSelected = selected === d.label;
        view?.setStatus(d.label, status(d.label));
        if (wasSelected && tab !== 'log') select(d.label, tab);
        break;
      }
      case 'run_finished': record.state = d.state; record.duration_ms = d.duration_ms ?? record.duration_ms; break;
      default: return;
    }
    if (kind === 'task_started') view?.setStatus(d.label, status(d.label));
    drawHead();
    paintWf();
  };

  (async () => {
    try {
      record = await api.run(id);
    } catch (e) {
      fill(split, h('div', { class: 'banner error' }, e instanceof Error ? e.message : String(e)));
      return;
    }
    if (record.workspace) {
      try { graph = await api.graph(record.workspace); } catch (e) { note(e); }
    }
    drawHead();
    const { nodes, edges } = graphNodes(graph, labels());
    view = new GraphView(nodes, edges, graph?.stages ?? {}, { onSelect: (l) => select(l) });
    paintAll();
    show(mode);
    loadAnalysis();
    if (selected) select(selected, tab);
    if (record.workspace && !isFinal(record.state)) {
      api.plan(record.workspace, record.targets).then((p) => { predictions = p.tasks; paintAll(); })
        .catch((e) => notes.append(h('div', { class: 'banner info' }, e instanceof ApiError && e.status === 404 && e.message.startsWith('No such endpoint')
          ? 'Cache predictions ("will be cached" / "will run: why") need the server\u2019s plan endpoint, which this server does not have yet.'
          : `No cache predictions: ${e instanceof Error ? e.message : String(e)}`)));
    }
    if (!isFinal(record.state)) {
      // Every state change of the run from the first (log lines are the
      // task panel's, read from the log endpoint); `end` closes it.
      const sse = new Sse(`/api/v1/runs/${encodeURIComponent(id)}/events?logs=false`, {
        resume: true,
        endOn: 'end',
        onMessage: (m) => {
          if (m.event === 'end') {
            api.run(id).then((r) => { record = r; drawHead(); paintAll(); paintWf(); loadAnalysis(); if (selected) select(selected, tab); }).catch(() => {});
            return;
          }
          if (m.event === 'task_log') return;
          try { onEvent(m.event, JSON.parse(m.data)); } catch { /* not JSON */ }
        },
      });
      cleanups.push(() => sse.close());
    }
  })();

  cleanups.push(everySecond(() => {
    if (!record || isFinal(record.state)) return;
    drawHead();
    for (const l of running.keys()) view?.setStatus(l, status(l));
    paintWf();
  }));
  cleanups.push(onAccess(() => drawHead()));
  return () => { cleanups.forEach((f) => f()); panel?.close(); };
}

// A workspace: its graph before anything runs, what a run of the chosen
// targets would do (per task "will be cached" or "will run: <why>", from the
// server's plan), a form to start that run, and links to its history.

import { api, ApiError, type Graph, type Prediction } from '../api';
import { canWrite, onAccess } from '../auth';
import { h, fill } from '../dom';
import { GraphView } from '../graph';
import { graphNodes } from '../model';
import { navigate } from '../nav';

export function workspaceView(root: HTMLElement, p: Record<string, string>): () => void {
  const ws = p.ws;
  const actions = h('span', { class: 'actions' });
  const notes = h('div', { class: 'notes' });
  const canvas = h('div', { class: 'run-split' });
  const side = h('section', { class: 'predictions', 'data-testid': 'predictions' }, h('p', { class: 'muted' }, 'Asking the server what a run would do…'));
  root.append(h('div', { class: 'view-head' }, h('h1', null, 'Workspace ', h('code', null, ws)),
    h('a', { href: `/runs?workspace=${encodeURIComponent(ws)}`, 'data-link': '' }, 'History'), ' ',
    h('a', { href: `/designer/${encodeURIComponent(ws)}`, 'data-link': '' }, 'Open in the designer'),
    h('span', { class: 'spacer' }), actions), notes, canvas);
  let graph: Graph | null = null;
  let view: GraphView | null = null;
  // The targets box outlives redraws of the form (a token typed later keeps what was typed).
  const targets = h('input', { type: 'text', value: '//...', 'aria-label': 'Targets', 'data-testid': 'targets', size: 30 });
  let planned: string | null = null;
  let planSeq = 0;
  let timer = 0;

  const drawActions = () => {
    fill(actions);
    if (!canWrite()) return;
    const form = h('form', { class: 'inline' }, targets, h('button', { type: 'submit', 'data-testid': 'start' }, 'Start a run'));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        const a = await api.start(ws, wanted());
        navigate(`/runs/${encodeURIComponent(a.id)}`);
      } catch (err) {
        notes.append(h('div', { class: 'banner error' }, err instanceof Error ? err.message : String(err)));
      }
    });
    actions.append(form);
  };
  const wanted = () => targets.value.split(/[\s,]+/).filter(Boolean);

  const showPlan = (tasks: Record<string, Prediction>) => {
    if (!graph || !view) return;
    const g = graph;
    const labels = g.order.filter((l) => tasks[l]);
    for (const l of g.order) {
      const pr = tasks[l];
      const kind = Object.keys(g.tasks[l]?.kind ?? {})[0] ?? '';
      view.setStatus(l, pr
        ? { state: 'pending', detail: kind, badge: pr.will_cache ? 'will be cached' : `will run: ${pr.reason ?? 'not cached'}`, badgeKind: pr.will_cache ? 'hit' : 'run' }
        : { state: 'skipped', detail: `${kind} · not a target`, badge: null, badgeKind: null });
    }
    const run = labels.filter((l) => !tasks[l].will_cache), hit = labels.filter((l) => tasks[l].will_cache);
    const item = (l: string) => {
      const pr = tasks[l];
      return h('li', { 'data-label': l, 'data-testid': 'prediction' },
        h('a', { href: '#', class: 'lbl', onclick: ((e: Event) => { e.preventDefault(); view?.focus(l); view?.select(l); }) as EventListener }, l),
        h('span', { class: `pr ${pr.will_cache ? 'pr-hit' : 'pr-run'}`, 'data-testid': 'prediction-text' },
          pr.will_cache ? 'will be cached' : `will run: ${pr.reason ?? 'not cached'}`),
        // Down to the files: what changed in the inputs that changed.
        pr.changed_paths?.length
          ? h('ul', { class: 'changed', 'data-testid': 'changed-paths' }, pr.changed_paths.map((p) => h('li', null, p)))
          : null);
    };
    fill(side,
      h('h2', null, 'If you start a run now'),
      h('p', { 'data-testid': 'plan-summary' }, labels.length
        ? `${hit.length} of ${labels.length} task${labels.length === 1 ? '' : 's'} will come from the cache; ${run.length} will run.`
        : 'These targets name no task.'),
      h('ul', null, run.map(item), hit.map(item)));
  };

  const plan = () => {
    const t = wanted();
    const key = t.join(',');
    if (key === planned) return;
    planned = key;
    const mine = ++planSeq;
    api.plan(ws, t).then((pl) => { if (mine === planSeq) showPlan(pl.tasks); }).catch((e) => {
      if (mine !== planSeq) return;
      fill(side, h('div', { class: `banner ${e instanceof ApiError && e.status === 400 ? 'error' : 'info'}` },
        e instanceof ApiError && e.status === 404 && e.message.startsWith('No such endpoint')
          ? 'This server cannot predict cache hits (no plan endpoint).'
          : `No cache predictions: ${e instanceof Error ? e.message : String(e)}`));
    });
  };
  // The predictions follow what is typed in the targets box.
  targets.addEventListener('input', () => { clearTimeout(timer); timer = window.setTimeout(plan, 300); });

  drawActions();
  const off = onAccess(drawActions);

  api.graph(ws).then((g) => {
    graph = g;
    const { nodes, edges } = graphNodes(g, g.order);
    view = new GraphView(nodes, edges, g.stages, { onSelect: (l) => notes.replaceChildren(h('div', { class: 'banner info' }, l, ': ', JSON.stringify(g.tasks[l]?.kind ?? {}))) });
    canvas.append(view.el, side);
    for (const l of g.order) view.setStatus(l, { state: 'pending', detail: Object.keys(g.tasks[l]?.kind ?? {})[0] ?? '', badge: null, badgeKind: null });
    requestAnimationFrame(() => view?.fit());
    if (g.sources.length) {
      notes.append(h('div', { class: 'banner info' }, 'Sources: ', g.sources.map((s, i) => [i ? ' · ' : '', s.label, ` (${s.kind}${s.trigger ? ', ' + s.trigger : ''})`])));
    }
    plan();
  }).catch((e) => fill(canvas, h('div', { class: 'banner error' }, e instanceof Error ? e.message : String(e))));
  return () => { off(); clearTimeout(timer); };
}

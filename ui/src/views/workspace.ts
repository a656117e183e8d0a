// A workspace: its graph before anything runs (with cache predictions when
// the server has them), a form to start a run, and its latest runs.

import { api, ApiError, type Graph } from '../api';
import { canWrite, onAccess } from '../auth';
import { h, fill } from '../dom';
import { GraphView } from '../graph';
import { graphNodes, isPure } from '../model';
import { navigate } from '../nav';

export function workspaceView(root: HTMLElement, p: Record<string, string>): () => void {
  const ws = p.ws;
  const actions = h('span', { class: 'actions' });
  const notes = h('div', { class: 'notes' });
  const canvas = h('div', { class: 'run-split' });
  root.append(h('div', { class: 'view-head' }, h('h1', null, 'Workspace ', h('code', null, ws)),
    h('a', { href: `/runs?workspace=${encodeURIComponent(ws)}`, 'data-link': '' }, 'History'), ' ',
    h('a', { href: `/designer/${encodeURIComponent(ws)}`, 'data-link': '' }, 'Open in the designer'),
    h('span', { class: 'spacer' }), actions), notes, canvas);
  let graph: Graph | null = null;

  const drawActions = () => {
    fill(actions);
    if (!canWrite()) return;
    const targets = h('input', { type: 'text', value: '//...', 'aria-label': 'Targets', 'data-testid': 'targets', size: 30 });
    const form = h('form', { class: 'inline' }, targets, h('button', { type: 'submit', 'data-testid': 'start' }, 'Start a run'));
    form.addEventListener('submit', async (e) => {
      e.preventDefault();
      try {
        const a = await api.start(ws, targets.value.split(/\s+/).filter(Boolean));
        navigate(`/runs/${encodeURIComponent(a.id)}`);
      } catch (err) {
        notes.append(h('div', { class: 'banner error' }, err instanceof Error ? err.message : String(err)));
      }
    });
    actions.append(form);
  };
  drawActions();
  const off = onAccess(drawActions);

  api.graph(ws).then((g) => {
    graph = g;
    const { nodes, edges } = graphNodes(g, g.order);
    const view = new GraphView(nodes, edges, g.stages, { onSelect: (l) => notes.replaceChildren(h('div', { class: 'banner info' }, l, ': ', JSON.stringify(g.tasks[l]?.kind ?? {}))) });
    canvas.append(view.el);
    for (const l of g.order) view.setStatus(l, { state: 'pending', detail: Object.keys(g.tasks[l]?.kind ?? {})[0] ?? '', badge: null, badgeKind: null });
    requestAnimationFrame(() => view.fit());
    if (g.sources.length) {
      notes.append(h('div', { class: 'banner info' }, 'Sources: ', g.sources.map((s, i) => [i ? ' · ' : '', s.label, ` (${s.kind}${s.trigger ? ', ' + s.trigger : ''})`])));
    }
    api.plan(ws, ['//...']).then((plan) => {
      for (const l of g.order) {
        const pr = plan.tasks[l];
        if (pr && isPure(graph, l)) view.setStatus(l, { state: 'pending', detail: 'pending', badge: pr.will_cache ? 'will be cached' : `will run: ${pr.reason ?? ''}`, badgeKind: pr.will_cache ? 'hit' : 'run' });
      }
    }).catch((e) => {
      if (!(e instanceof ApiError && e.status === 404)) notes.append(h('div', { class: 'banner info' }, `No cache predictions: ${e.message}`));
    });
  }).catch((e) => fill(canvas, h('div', { class: 'banner error' }, e instanceof Error ? e.message : String(e))));
  return off;
}

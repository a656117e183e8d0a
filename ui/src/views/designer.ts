// The pipeline designer: open a workspace's model (or start empty), add and
// remove tasks and edges, edit fields, see validation errors as you type,
// and export `BUILD.star` files and JSON.

import { api, ApiError, type ModelTask } from '../api';
import { h, fill } from '../dom';
import { GraphView } from '../graph';
import { graphNodes, kindOf } from '../model';
import { navigate } from '../nav';
import { exportStarlark, type Model } from '../starlark';

const LABEL = /^\/\/[A-Za-z0-9_.\-/]*:[A-Za-z0-9_.\-+]+$/;

/** Problems the page can see by itself (the server's gate has the last word). */
export function localProblems(m: Model): string[] {
  const out: string[] = [];
  const labels = new Set(Object.keys(m.tasks));
  for (const [l, t] of Object.entries(m.tasks)) {
    if (!LABEL.test(l)) out.push(`\`${l}\` is not a label like //pkg:name`);
    const k = kindOf(t);
    const refs = [...(t.deps ?? []).map((d) => d.label), ...(t.transform ? [t.transform] : [])];
    if (k === 'merge') refs.push((t.kind as any).merge.base, ...((t.kind as any).merge.sides ?? []));
    for (const r of refs) if (!labels.has(r)) out.push(`\`${l}\` reads \`${r}\`, which is not a task`);
    if (t.stage && !m.stages[t.stage]) out.push(`\`${l}\` is in stage \`${t.stage}\`, which is not declared`);
    if (k === 'run') {
      const cmd = (t.kind as any).run.cmd ?? {};
      if (cmd.script === undefined && !cmd.argv?.length) out.push(`\`${l}\` has no command`);
    }
    const mounts = (t.deps ?? []).map((d) => d.mount);
    const dup = mounts.find((x, i) => mounts.indexOf(x) !== i);
    if (dup) out.push(`\`${l}\` mounts two inputs at \`${dup}\``);
  }
  // Cycles.
  const state = new Map<string, number>();
  const reads = (l: string) => {
    const t = m.tasks[l];
    if (!t) return [];
    const k = (t.kind as any).merge;
    return [...(t.deps ?? []).map((d) => d.label), ...(t.transform ? [t.transform] : []), ...(k ? [k.base, ...(k.sides ?? [])] : [])];
  };
  const visit = (l: string, path: string[]): void => {
    if (state.get(l) === 2) return;
    if (state.get(l) === 1) { out.push(`cycle: ${[...path.slice(path.indexOf(l)), l].join(' → ')}`); return; }
    state.set(l, 1);
    for (const r of reads(l)) if (labels.has(r)) visit(r, [...path, l]);
    state.set(l, 2);
  };
  for (const l of labels) visit(l, []);
  return out;
}

function clone<T>(v: T): T { return JSON.parse(JSON.stringify(v)); }

/** The model without what does not round-trip (declaration locations). */
export function stripLocations(m: Model): Model {
  const out = clone(m);
  for (const t of Object.values(out.tasks)) delete t.location;
  for (const s of Object.values(out.stages)) delete (s as any).location;
  return out;
}

export function designerView(root: HTMLElement, p: Record<string, string>): () => void {
  let model: Model = { tasks: {}, stages: {} };
  let selected: string | null = null;
  let stagesBox: HTMLElement = h('div');
  const problems = h('div', { class: 'problems', 'data-testid': 'problems', 'aria-live': 'polite' });
  const list = h('ul', { class: 'task-list', 'data-testid': 'designer-tasks' });
  const editor = h('div', { class: 'editor' });
  const preview = h('div', { class: 'designer-graph' });
  const output = h('div', { class: 'export' });
  const wsSel = h('select', { 'aria-label': 'Open a workspace' }, h('option', { value: '' }, 'new, empty pipeline'));
  wsSel.addEventListener('change', () => navigate(wsSel.value ? `/designer/${encodeURIComponent(wsSel.value)}` : '/designer'));
  root.append(
    h('div', { class: 'view-head' }, h('h1', null, 'Pipeline designer'), wsSel, h('span', { class: 'spacer' }),
      h('button', { onclick: (() => exportAll('star')) as EventListener, 'data-testid': 'export-star' }, 'Export BUILD.star'),
      h('button', { onclick: (() => exportAll('json')) as EventListener, 'data-testid': 'export-json' }, 'Export JSON')),
    h('div', { class: 'designer' },
      h('section', { class: 'panel' }, h('h2', null, 'Tasks'), list,
        h('button', { class: 'small', onclick: (() => addTask()) as EventListener, 'data-testid': 'add-task' }, 'Add a task'),
        h('h2', null, 'Stages'), stagesEditor()),
      h('section', { class: 'panel grow' }, problems, preview, output),
      h('section', { class: 'panel' }, editor)));
  api.workspaces().then((ws) => { for (const w of ws) wsSel.append(h('option', { value: w.name, selected: w.name === p.ws }, w.name)); }).catch(() => {});

  function stagesEditor(): HTMLElement {
    stagesBox = h('div');
    return stagesBox;
  }

  let timer = 0, seq = 0;
  let graphView: GraphView | null = null;
  function changed(redrawGraph = true): void {
    drawList();
    if (redrawGraph) drawGraph();
    drawStages();
    // Validate as you type: local checks at once, the server's gate shortly after.
    const local = localProblems(model);
    showProblems(local, 'checking with the server…');
    clearTimeout(timer);
    timer = window.setTimeout(async () => {
      const mine = ++seq;
      let server: string;
      try {
        await api.validate(stripLocations(model));
        server = 'the server accepts this pipeline';
      } catch (e) {
        if (e instanceof ApiError && e.status === 404 && e.message.startsWith('No such endpoint')) server = 'the server has no validation endpoint yet (POST /api/v1/validate); only the checks above ran';
        else if (e instanceof ApiError && (e.status === 401 || e.status === 403)) server = `the server's validation needs a token: ${e.message}`;
        else server = `server: ${e instanceof Error ? e.message : String(e)}`;
        if (e instanceof ApiError && e.status === 400) { if (mine === seq) showProblems([...local, e.message], ''); return; }
      }
      if (mine === seq) showProblems(local, server);
    }, 400);
  }

  function showProblems(local: string[], server: string): void {
    fill(problems, local.length ? h('ul', { class: 'banner error' }, local.map((x) => h('li', null, x))) : h('div', { class: 'banner ok' }, 'No problems found'),
      server ? h('div', { class: 'muted' }, server) : null);
  }

  function drawList(): void {
    fill(list, Object.keys(model.tasks).sort().map((l) => h('li', { class: l === selected ? 'sel' : '' },
      h('a', { href: '#', onclick: ((e: Event) => { e.preventDefault(); select(l); }) as EventListener }, l),
      h('span', { class: 'muted' }, ` ${kindOf(model.tasks[l])}`))));
  }

  function drawGraph(): void {
    const g = { workspace: '', order: Object.keys(model.tasks), tasks: model.tasks, stages: model.stages, edges: edgesOf(model), sources: [] };
    const { nodes, edges } = graphNodes(g as any, Object.keys(model.tasks));
    graphView = new GraphView(nodes, edges, model.stages, { onSelect: (l) => select(l) });
    for (const n of nodes) graphView.setStatus(n.label, { state: 'pending', detail: n.kind, badge: null, badgeKind: null });
    fill(preview, graphView.el);
    requestAnimationFrame(() => graphView?.fit());
    if (selected) graphView.select(selected);
  }

  function drawStages(): void {
    const name = h('input', { placeholder: 'name', size: 10, 'aria-label': 'New stage name' });
    const after = h('input', { placeholder: 'after (space separated)', size: 14, 'aria-label': 'New stage after' });
    fill(stagesBox, h('ul', null, Object.values(model.stages).map((s) => h('li', null, s.name, s.after?.length ? h('span', { class: 'muted' }, ` after ${s.after.join(', ')}`) : null, ' ',
      h('button', { class: 'small', onclick: (() => { delete model.stages[s.name]; changed(); }) as EventListener }, '×')))),
      h('form', { class: 'inline', onsubmit: ((e: Event) => {
        e.preventDefault();
        if (!name.value.trim()) return;
        model.stages[name.value.trim()] = { name: name.value.trim(), after: after.value.split(/\s+/).filter(Boolean) };
        changed();
      }) as EventListener }, name, after, h('button', { class: 'small', type: 'submit' }, 'Add stage')));
  }

  function addTask(): void {
    let n = 1;
    while (model.tasks[`//:task${n}`]) n++;
    const label = `//:task${n}`;
    model.tasks[label] = { label, kind: { run: { cmd: { script: 'echo hello > out.txt' }, pure: true } } };
    selected = label;
    changed();
    select(label);
  }

  function rename(old: string, neu: string): void {
    if (old === neu || model.tasks[neu]) return;
    const t = model.tasks[old];
    delete model.tasks[old];
    t.label = neu;
    model.tasks[neu] = t;
    for (const o of Object.values(model.tasks)) {
      for (const d of o.deps ?? []) if (d.label === old) d.label = neu;
      if (o.transform === old) o.transform = neu;
      const m = (o.kind as any).merge;
      if (m) { if (m.base === old) m.base = neu; m.sides = (m.sides ?? []).map((s: string) => (s === old ? neu : s)); }
    }
    selected = neu;
  }

  function select(label: string): void {
    selected = label;
    drawList();
    graphView?.select(label);
    const t = model.tasks[label];
    if (!t) { fill(editor); return; }
    const kind = kindOf(t);
    const k = (t.kind as any)[kind];
    const field = (name: string, input: HTMLElement) => h('label', { class: 'field' }, h('span', null, name), input);
    const text = (value: string, on: (v: string) => void, attrs: Record<string, string> = {}) => {
      const el = h('input', { type: 'text', value, ...attrs });
      el.addEventListener('input', () => { on(el.value); changed(false); });
      el.addEventListener('change', () => changed());
      return el;
    };
    const area = (value: string, on: (v: string) => void, rows = 6) => {
      const el = h('textarea', { rows, spellcheck: 'false' });
      el.value = value;
      el.addEventListener('input', () => { on(el.value); changed(false); });
      return el;
    };
    const check = (value: boolean, on: (v: boolean) => void) => {
      const el = h('input', { type: 'checkbox', checked: value });
      el.addEventListener('change', () => { on(el.checked); changed(); });
      return el;
    };
    const labelInput = h('input', { type: 'text', value: label, 'data-testid': 'edit-label' });
    labelInput.addEventListener('change', () => { rename(label, labelInput.value.trim()); changed(); select(selected!); });
    const rows: HTMLElement[] = [field('label', labelInput)];
    rows.push(field('stage', (() => {
      const sel = h('select', null, h('option', { value: '' }, '(none)'), Object.keys(model.stages).map((s) => h('option', { value: s, selected: s === t.stage }, s)));
      sel.addEventListener('change', () => { if (sel.value) t.stage = sel.value; else delete t.stage; changed(); });
      return sel;
    })()));
    if (kind === 'run') {
      const isScript = k.cmd?.script !== undefined;
      rows.push(field(isScript ? 'script (/bin/sh -e)' : 'cmd (one argument a line)', area(isScript ? k.cmd.script : (k.cmd?.argv ?? []).join('\n'),
        (v) => { k.cmd = isScript ? { script: v } : { argv: v.split('\n') }; }, 8)));
      rows.push(h('button', { class: 'small', onclick: (() => { k.cmd = isScript ? { argv: ['/bin/sh', '-c', k.cmd.script] } : { script: (k.cmd?.argv ?? []).join(' ') }; changed(); select(label); }) as EventListener },
        isScript ? 'Use an argument list instead' : 'Use a script instead'));
      rows.push(field('inputs (mount=label, one a line)', area((t.deps ?? []).map((d) => `${d.mount}=${d.label}`).join('\n'), (v) => {
        t.deps = v.split('\n').map((x) => x.trim()).filter(Boolean).map((x) => {
          const i = x.indexOf('=');
          const lab = i < 0 ? x : x.slice(i + 1).trim();
          return { mount: i < 0 ? lab.slice(lab.indexOf(':') + 1) : x.slice(0, i).trim(), label: lab };
        });
        if (!t.deps.length) delete t.deps;
      }, 3)));
      rows.push(field('transform of', text(t.transform ?? '', (v) => { if (v.trim()) t.transform = v.trim(); else delete t.transform; })));
      rows.push(field('image', text(k.image ?? '', (v) => { if (v) k.image = v; else delete k.image; })));
      rows.push(field('env (KEY=VALUE a line)', area(Object.entries(k.env ?? {}).map(([a, b]) => `${a}=${b}`).join('\n'), (v) => {
        const env: Record<string, string> = {};
        for (const line of v.split('\n')) { const i = line.indexOf('='); if (i > 0) env[line.slice(0, i)] = line.slice(i + 1); }
        if (Object.keys(env).length) k.env = env; else delete k.env;
      }, 3)));
      rows.push(field('pure (memoized)', check(k.pure !== false, (v) => { k.pure = v; })));
      rows.push(field('effects (deploys)', check(!!k.effects, (v) => { if (v) k.effects = true; else delete k.effects; })));
      rows.push(field('network', check(!!k.network, (v) => { if (v) k.network = true; else delete k.network; })));
      rows.push(field('timeout (seconds)', text(k.timeout_secs ? String(k.timeout_secs) : '', (v) => { const n = parseInt(v, 10); if (n > 0) k.timeout_secs = n; else delete k.timeout_secs; })));
      rows.push(field('retries', text(k.retries ? String(k.retries) : '', (v) => { const n = parseInt(v, 10); if (n > 0) k.retries = n; else delete k.retries; })));
    } else if (kind === 'merge') {
      rows.push(field('base', text(k.base ?? '', (v) => { k.base = v.trim(); })));
      rows.push(field('sides (one a line)', area((k.sides ?? []).join('\n'), (v) => { k.sides = v.split('\n').map((x) => x.trim()).filter(Boolean); }, 3)));
      rows.push(field('on conflict', (() => {
        const sel = h('select', null, ['fail', 'ours', 'theirs'].map((o) => h('option', { value: o, selected: o === (k.on_conflict ?? 'fail') }, o)));
        sel.addEventListener('change', () => { k.on_conflict = sel.value; changed(); });
        return sel;
      })()));
    } else if (kind === 'local_source') {
      rows.push(field('path (from the workspace root)', text(k.path ?? '.', (v) => { k.path = v; })));
      rows.push(field('exclude (one a line)', area((k.exclude ?? []).join('\n'), (v) => { k.exclude = v.split('\n').filter(Boolean); if (!k.exclude.length) delete k.exclude; }, 3)));
      rows.push(field('watch', check(!!k.watch, (v) => { if (v) k.watch = true; else delete k.watch; })));
    }
    // Everything, including what has no form field, as JSON.
    const json = h('textarea', { rows: 10, spellcheck: 'false', 'data-testid': 'task-json' });
    json.value = JSON.stringify({ ...t, location: undefined }, null, 2);
    const jsonErr = h('div', { class: 'muted' });
    json.addEventListener('input', () => {
      try {
        const v = JSON.parse(json.value) as ModelTask;
        v.label = label;
        model.tasks[label] = v;
        jsonErr.textContent = '';
        changed(false);
      } catch (e) { jsonErr.textContent = `not JSON yet: ${(e as Error).message}`; }
    });
    json.addEventListener('change', () => { changed(); });
    fill(editor, h('h2', null, 'Task'), rows,
      h('details', null, h('summary', null, 'The task as JSON (every field)'), json, jsonErr),
      h('div', { class: 'row' },
        h('button', { class: 'danger small', 'data-testid': 'remove-task', onclick: (() => { delete model.tasks[label]; selected = null; fill(editor); changed(); }) as EventListener }, 'Remove this task'),
        h('button', { class: 'small', onclick: (() => {
          const from = prompt('Add an input: the label of the task to read', '//:');
          if (!from) return;
          (t.deps ??= []).push({ mount: from.slice(from.indexOf(':') + 1), label: from });
          changed(); select(label);
        }) as EventListener }, 'Add an input edge')));
  }

  function exportAll(kind: 'star' | 'json'): void {
    const clean = stripLocations(model);
    if (kind === 'json') {
      fill(output, h('h3', null, 'pipeline.json'), saveButton('pipeline.json', JSON.stringify(clean, null, 2)),
        h('pre', { class: 'pre', 'data-testid': 'export-text' }, JSON.stringify(clean, null, 2)));
      return;
    }
    const files = exportStarlark(clean);
    fill(output, Object.entries(files).map(([path, text]) => h('div', { class: 'export-file', 'data-file': path },
      h('h3', null, path), saveButton(path.replace(/\//g, '_'), text), h('pre', { class: 'pre', 'data-testid': 'export-text' }, text))));
  }

  function saveButton(name: string, text: string): HTMLElement {
    return h('button', { class: 'small', onclick: (() => {
      const href = URL.createObjectURL(new Blob([text], { type: 'text/plain' }));
      const a = h('a', { href, download: name });
      document.body.append(a); a.click(); a.remove();
      setTimeout(() => URL.revokeObjectURL(href), 10_000);
    }) as EventListener }, `Download ${name}`);
  }

  if (p.ws) {
    api.graph(p.ws).then((g) => {
      model = { tasks: g.tasks, stages: g.stages };
      changed();
    }).catch((e) => fill(problems, h('div', { class: 'banner error' }, e instanceof Error ? e.message : String(e))));
  } else {
    changed();
  }
  return () => clearTimeout(timer);
}

function edgesOf(m: Model) {
  const out: { from: string; to: string; kind: 'input' | 'transform' | 'merge_base' | 'merge_side' }[] = [];
  for (const [l, t] of Object.entries(m.tasks)) {
    for (const d of t.deps ?? []) out.push({ from: d.label, to: l, kind: 'input' });
    if (t.transform) out.push({ from: t.transform, to: l, kind: 'transform' });
    const k = (t.kind as any).merge;
    if (k) { out.push({ from: k.base, to: l, kind: 'merge_base' }); for (const s of k.sides ?? []) out.push({ from: s, to: l, kind: 'merge_side' }); }
  }
  return out;
}

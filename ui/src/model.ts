// Helpers over the pipeline model the API returns.

import type { Edge, Graph } from './api';
import type { GNode } from './graph';

export function pkgOf(label: string): string {
  const i = label.indexOf(':');
  return label.slice(2, i < 0 ? undefined : i);
}

/** Whether `label` is named by a target pattern (`//...`, `//p/...`, `//p:all`, `//p:n`). */
export function matches(pattern: string, label: string): boolean {
  if (pattern === '//...' || pattern === '') return true;
  if (pattern.endsWith('/...')) {
    const p = pattern.slice(2, -4);
    const pk = pkgOf(label);
    return pk === p || pk.startsWith(p + '/');
  }
  if (pattern.endsWith(':all')) return pkgOf(label) === pattern.slice(2, -4);
  return pattern === label;
}

/** The targets and everything they read. */
export function cone(g: Graph, targets: string[]): Set<string> {
  const all = Object.keys(g.tasks);
  const want = targets.length ? all.filter((l) => targets.some((t) => matches(t, l))) : all;
  const preds = new Map<string, string[]>();
  for (const e of g.edges) (preds.get(e.to) ?? preds.set(e.to, []).get(e.to)!).push(e.from);
  const out = new Set<string>();
  const stack = [...want];
  while (stack.length) {
    const l = stack.pop()!;
    if (out.has(l)) continue;
    out.add(l);
    stack.push(...(preds.get(l) ?? []));
  }
  return out;
}

export function kindOf(t: { kind: Record<string, unknown> }): string {
  return Object.keys(t.kind)[0] ?? 'run';
}

export function graphNodes(g: Graph | null, labels: Iterable<string>): { nodes: GNode[]; edges: Edge[] } {
  const set = new Set(labels);
  const order = g ? [...g.order.filter((l) => set.has(l)), ...[...set].filter((l) => !g.tasks[l])] : [...set].sort();
  const nodes = order.map((label) => ({
    label,
    stage: g?.tasks[label]?.stage ?? null,
    kind: g?.tasks[label] ? kindOf(g.tasks[label]) : 'run',
  }));
  const edges = (g?.edges ?? []).filter((e) => set.has(e.from) && set.has(e.to));
  return { nodes, edges };
}

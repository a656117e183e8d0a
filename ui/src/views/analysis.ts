// What `GET /api/v1/runs/{id}/analysis` says of a run, in sentences: the
// critical path, how parallel the run was, pure tasks that keep missing the
// cache, impure tasks that hold the run up.

import type { Analysis } from '../api';
import { h, type Child } from '../dom';
import { dur } from '../util';

const SHOWN = 8;

function labelLink(label: string, onSelect: (l: string) => void): HTMLElement {
  return h('a', { href: '#', class: 'lbl', 'data-label': label, onclick: ((e: Event) => { e.preventDefault(); onSelect(label); }) as EventListener }, label);
}

/** A list that shows its first few items and the rest behind a click. */
function some<T>(items: T[], each: (x: T) => Child, attrs: Record<string, string> = {}): HTMLElement {
  const ol = h('ol', { class: 'chain', ...attrs }, items.slice(0, SHOWN).map((x) => h('li', null, each(x))));
  if (items.length > SHOWN) {
    const more = h('li', { class: 'more' }, h('button', { class: 'small', onclick: (() => {
      more.remove();
      ol.append(...items.slice(SHOWN).map((x) => h('li', null, each(x))));
    }) as EventListener }, `show ${items.length - SHOWN} more`));
    ol.append(more);
  }
  return ol;
}

function pct(part: number, whole: number): string {
  return whole > 0 ? `${Math.round((part / whole) * 100)}%` : '–';
}

export function analysisPanel(a: Analysis, onSelect: (label: string) => void): HTMLElement {
  const wall = a.duration_ms;
  const cp = a.critical_path;
  const slack = Math.max(0, wall - a.critical_ms);
  const critical = h('div', { class: 'fact', 'data-testid': 'analysis-critical' },
    h('h3', null, 'Critical path'),
    cp.length
      ? [h('p', null, `${cp.length} task${cp.length === 1 ? '' : 's'} in a chain, ${dur(a.critical_ms)} of work: no schedule could finish this run sooner. `,
          wall > 0 ? `The run took ${dur(wall)}` : '',
          wall > 0 ? (slack <= Math.max(50, wall * 0.1)
            ? ', about as long as its critical path: to make it faster, shorten the tasks on it.'
            : `, ${dur(slack)} more than its critical path: tasks waited for a job slot or for the scheduler (more jobs could help).`) : ''),
        some(cp, (s) => [labelLink(s.label, onSelect), ' ', h('span', { class: 'muted' }, s.cached ? 'from the cache' : `${dur(s.duration_ms)} · ${pct(s.duration_ms, a.critical_ms)}`)],
          { 'data-testid': 'critical-path' })]
      : h('p', { class: 'muted' }, 'No task of this run has a recorded duration yet.'));

  const p = a.parallelism;
  const busy = p < 1.15 ? 'close to one task at a time' : p < 1.8 ? 'a little parallel' : `${p.toFixed(1)} tasks at a time on average`;
  const levels = a.levels.filter((l) => l.tasks > 0);
  const parallel = h('div', { class: 'fact', 'data-testid': 'analysis-parallelism' },
    h('h3', null, 'Parallelism'),
    h('p', null, `On average ${p.toFixed(1)} task${p.toFixed(1) === '1.0' ? ' was' : 's were'} working at once (the sum of task times over the wall time): ${busy}.`),
    levels.length ? h('table', { class: 'levels' },
      h('thead', null, h('tr', null, h('th', null, 'level'), h('th', { class: 'num' }, 'tasks'), h('th', { class: 'num' }, 'ran'), h('th', { class: 'num' }, 'work'))),
      h('tbody', null, levels.slice(0, 12).map((l) => h('tr', null, h('td', null, String(l.level)), h('td', { class: 'num' }, String(l.tasks)),
        h('td', { class: 'num' }, String(l.executed)), h('td', { class: 'num' }, dur(l.duration_ms))))),
      levels.length > 12 ? h('tfoot', null, h('tr', null, h('td', { colspan: 4, class: 'muted' }, `and ${levels.length - 12} more levels`))) : null) : null);

  const never = h('div', { class: 'fact', 'data-testid': 'analysis-never-cached' },
    h('h3', null, 'Pure tasks that never come from the cache'),
    a.never_cached.length
      ? [h('p', null, `${a.never_cached.length} pure task${a.never_cached.length === 1 ? '' : 's'} never came from the cache in this store's runs, and ran at least once although every input came from the cache: something in ${a.never_cached.length === 1 ? 'its' : 'their'} own action key changes each time (an environment variable, a date in the command, an unpinned image).`),
        some(a.never_cached, (n) => [labelLink(n.label, onSelect), ' ', h('span', { class: 'muted' }, `ran in ${n.runs} runs, never cached`)])]
      : h('p', null, 'None: every pure task either came from the cache or had an input that changed.'));

  const impure = h('div', { class: 'fact', 'data-testid': 'analysis-impure' },
    h('h3', null, 'Tasks that run every time, on the critical path'),
    a.impure_on_critical_path.length
      ? [h('p', null, `${a.impure_on_critical_path.length === 1 ? 'This task is' : 'These tasks are'} impure or ${a.impure_on_critical_path.length === 1 ? 'has' : 'have'} outside effects, so ${a.impure_on_critical_path.length === 1 ? 'it is never cached and holds' : 'they are never cached and hold'} up every run:`),
        some(a.impure_on_critical_path, (l) => labelLink(l, onSelect))]
      : h('p', null, 'None: nothing on the critical path is forced to run every time.'));

  const grid = h('section', { class: 'analysis', 'data-testid': 'analysis' }, critical, parallel, never, impure,
    a.unknown_tasks.length ? h('div', { class: 'banner info wide' },
      `${a.unknown_tasks.length} task${a.unknown_tasks.length === 1 ? ' of this run is' : 's of this run are'} no longer in the pipeline and left out of the analysis: `,
      a.unknown_tasks.slice(0, 5).join(', '), a.unknown_tasks.length > 5 ? ` and ${a.unknown_tasks.length - 5} more` : '') : null);
  // One line that stays when the cards are folded away (more room for the rows).
  const gist = [`critical path ${dur(a.critical_ms)} of ${dur(wall)}`, `parallelism ${p.toFixed(1)}`,
    a.never_cached.length ? `${a.never_cached.length} never cached` : '',
    a.impure_on_critical_path.length ? `${a.impure_on_critical_path.length} impure task${a.impure_on_critical_path.length === 1 ? '' : 's'} on it` : '']
    .filter(Boolean).join(' · ');
  return h('details', { open: true, 'data-testid': 'analysis-details' }, h('summary', null, h('strong', null, 'Analysis'), ' ', h('span', { class: 'muted' }, gist)), grid);
}

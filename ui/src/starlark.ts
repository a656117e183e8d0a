// The pipeline model written back as `BUILD.star` files, one per package,
// such that loading them gives the same model (locations aside). Macros
// and `load()`s of the original are not recovered: every task is written
// out as the plain call it became.

import type { ModelTask } from './api';
import { pkgOf } from './model';

export interface Model {
  tasks: Record<string, ModelTask>;
  stages: Record<string, { name: string; after?: string[] }>;
  settings?: Record<string, unknown>;
}

/** A Starlark string literal with exactly `s`'s characters. */
export function str(s: string): string {
  if (s.includes('\n') && !s.includes('"""') && !s.endsWith('"') && !/[\x00-\x09\x0b-\x1f\x7f]/.test(s)) {
    return '"""' + s.replace(/\\/g, '\\\\') + '"""';
  }
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0)!;
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\t') out += '\\t';
    else if (ch === '\r') out += '\\r';
    else if (c < 0x20 || c === 0x7f) out += '\\x' + c.toString(16).padStart(2, '0');
    else out += ch;
  }
  return out + '"';
}

function list(items: string[]): string {
  return `[${items.map(str).join(', ')}]`;
}

function dict(d: Record<string, string>): string {
  return `{${Object.entries(d).map(([k, v]) => `${str(k)}: ${str(v)}`).join(', ')}}`;
}

/** A label as written inside package `pkg`: `:name` when local. */
function ref(label: string, pkg: string): string {
  return pkgOf(label) === pkg ? label.slice(label.indexOf(':')) : label;
}

/** `target` (workspace-relative, `.` = root) relative to the package directory `pkg`. */
export function relPath(target: string, pkg: string): string {
  const t = target === '.' ? [] : target.split('/');
  const p = pkg ? pkg.split('/') : [];
  let i = 0;
  while (i < t.length && i < p.length && t[i] === p[i]) i++;
  const parts = [...p.slice(i).map(() => '..'), ...t.slice(i)];
  return parts.length ? parts.join('/') : '.';
}

function call(fn: string, args: [string, string | undefined | null | false][]): string {
  const given = args.filter((a): a is [string, string] => typeof a[1] === 'string');
  return `${fn}(\n${given.map(([k, v]) => `    ${k} = ${v},\n`).join('')})\n`;
}

function taskCall(t: ModelTask, pkg: string): string {
  const name = t.label.slice(t.label.indexOf(':') + 1);
  const kind = Object.keys(t.kind)[0];
  const k = (t.kind as any)[kind] ?? {};
  const stage = t.stage ? str(t.stage) : undefined;
  switch (kind) {
    case 'run': {
      const deps = t.deps ?? [];
      const plain = deps.every((d) => d.mount === d.label.slice(d.label.indexOf(':') + 1));
      const depsText = deps.length === 0 ? undefined : plain ? `[${deps.map((d) => str(ref(d.label, pkg))).join(', ')}]`
        : `{${deps.map((d) => `${str(d.mount)}: ${str(ref(d.label, pkg))}`).join(', ')}}`;
      const effects = !!k.effects, network = !!k.network, pure = k.pure !== false;
      const defaultPure = !effects && !network;
      const services = k.services && Object.keys(k.services).length ? `{${Object.entries(k.services as Record<string, any>).map(([n, s]) =>
        `${str(n)}: service(image = ${str(s.image)}${s.cmd ? `, cmd = ${list(s.cmd)}` : ''}${s.env && Object.keys(s.env).length ? `, env = ${dict(s.env)}` : ''}${s.ready?.length ? `, ready = ${list(s.ready)}` : ''})`).join(', ')}}` : undefined;
      return call('task', [
        ['name', str(name)],
        ['deps', depsText],
        ['transform', t.transform ? str(ref(t.transform, pkg)) : undefined],
        ['cmd', k.cmd?.argv ? list(k.cmd.argv) : undefined],
        ['script', k.cmd?.script !== undefined ? str(k.cmd.script) : undefined],
        ['image', k.image ? str(k.image) : undefined],
        ['env', k.env && Object.keys(k.env).length ? dict(k.env) : undefined],
        ['secret_env', k.secret_env?.length ? list(k.secret_env) : undefined],
        ['pure', pure !== defaultPure ? (pure ? 'True' : 'False') : undefined],
        ['effects', effects ? 'True' : undefined],
        ['network', network ? 'True' : undefined],
        ['timeout', k.timeout_secs ? String(k.timeout_secs) : undefined],
        ['retries', k.retries ? String(k.retries) : undefined],
        ['executor', k.executor ? str(k.executor) : undefined],
        ['services', services],
        ['workdir', k.workdir ? str(k.workdir) : undefined],
        ['user', k.user ? str(k.user) : undefined],
        ['stage', stage],
      ]);
    }
    case 'merge':
      return call('merge', [
        ['name', str(name)],
        ['base', str(ref(k.base, pkg))],
        ['sides', `[${(k.sides as string[]).map((s) => str(ref(s, pkg))).join(', ')}]`],
        ['on_conflict', k.on_conflict && k.on_conflict !== 'fail' ? str(k.on_conflict) : undefined],
        ['stage', stage],
      ]);
    case 'local_source':
      return call('local_source', [
        ['name', str(name)],
        ['path', str(relPath(k.path ?? '.', pkg))],
        ['exclude', k.exclude?.length ? list(k.exclude) : undefined],
        ['watch', k.watch ? 'True' : undefined],
      ]);
    case 'git_source': {
      const url: string = k.url ?? '';
      const local = url !== '' && !url.includes('://') && !url.includes('@') && !url.startsWith('/');
      return call('git_source', [
        ['name', str(name)],
        ['url', str(local ? relPath(url, pkg) : url)],
        ['ref', str(k.rev ?? '')],
        ['poll', k.poll_secs ? String(k.poll_secs) : undefined],
        ['on', k.on ? str(k.on) : undefined],
      ]);
    }
    case 'timer':
      return call('timer', [
        ['name', str(name)],
        ['every', k.every_secs ? String(k.every_secs) : undefined],
        ['cron', k.cron ? str(k.cron) : undefined],
      ]);
    case 'webhook':
      return call('webhook', [
        ['name', str(name)],
        ['secret_env', str(k.secret_env ?? '')],
        ['kind', k.kind && k.kind !== 'generic' ? str(k.kind) : undefined],
      ]);
    default:
      return `# ${str(t.label)}: a task of kind ${str(kind)} that this exporter does not know\n`;
  }
}

/** Path of each `BUILD.star` → its text. */
export function exportStarlark(m: Model): Record<string, string> {
  const files: Record<string, string[]> = {};
  const add = (pkg: string, text: string) => (files[pkg] ??= []).push(text);
  const stageNames = Object.keys(m.stages);
  // Stages in dependency order (a stage's `after` must not be required to come first, but it reads better).
  const done = new Set<string>();
  const emit = (n: string, depth = 0) => {
    if (done.has(n) || depth > 1000 || !m.stages[n]) return;
    done.add(n);
    for (const a of m.stages[n].after ?? []) emit(a, depth + 1);
    const after = m.stages[n].after ?? [];
    add('', `stage(name = ${str(n)}${after.length ? `, after = ${list(after)}` : ''})\n`);
  };
  stageNames.sort().forEach((n) => emit(n));
  const labels = Object.keys(m.tasks).sort();
  for (const l of labels) add(pkgOf(l), taskCall(m.tasks[l], pkgOf(l)));
  const out: Record<string, string> = {};
  for (const pkg of Object.keys(files).sort()) {
    out[pkg ? `${pkg}/BUILD.star` : 'BUILD.star'] = `# Written by the Strata pipeline designer.\n\n${files[pkg].join('\n')}`;
  }
  return out;
}

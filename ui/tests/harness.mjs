// The browser tests' harness: a real `ci serve` on 127.0.0.1 at a free
// port over a copy of a fixture workspace, and Debian's Chromium driven by
// playwright-core. Nothing here downloads anything.

import { spawn, execFileSync } from 'node:child_process';
import { cpSync, mkdtempSync, rmSync, writeFileSync, mkdirSync, existsSync } from 'node:fs';
import { tmpdir, homedir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const repo = join(here, '..', '..');

export function ciBin() {
  const bin = process.env.STRATA_CI_BIN
    ?? join(process.env.CARGO_TARGET_DIR ?? join(homedir(), '.cache', 'strata-target'), 'debug', 'ci');
  if (!existsSync(bin)) throw new Error(`no ci binary at ${bin}: run \`cargo build --workspace\` (or set STRATA_CI_BIN)`);
  return bin;
}

export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

/**
 * Starts `ci serve` over copies of the given fixtures (names under
 * fixtures/, or {name, files} objects written from scratch).
 */
export async function startServer(workspaces, extraArgs = []) {
  const dir = mkdtempSync(join(tmpdir(), 'strata-ui-'));
  const store = join(dir, 'store');
  const roots = [];
  for (const ws of workspaces) {
    const root = join(dir, typeof ws === 'string' ? ws : ws.name);
    if (typeof ws === 'string') cpSync(join(repo, 'fixtures', ws), root, { recursive: true });
    else {
      for (const [path, text] of Object.entries(ws.files)) {
        mkdirSync(dirname(join(root, path)), { recursive: true });
        writeFileSync(join(root, path), text);
      }
    }
    roots.push(root);
  }
  const server = { dir, store, roots, proc: null, url: '', stderr: '' };
  await launch(server, extraArgs);
  return server;
}

async function launch(server, extraArgs = []) {
  const listen = extraArgs.includes('--listen') ? [] : ['--listen', '127.0.0.1:0'];
  const proc = spawn(ciBin(), ['serve', ...listen, ...extraArgs, ...server.roots], {
    env: { ...process.env, CI_STORE: server.store, NO_COLOR: '1' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  server.proc = proc;
  server.url = await new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`ci serve did not say where it listens:\n${buf}`)), 60_000);
    proc.stderr.on('data', (d) => {
      buf += d;
      server.stderr += d;
      const m = /Serving on (http:\/\/127\.0\.0\.1:\d+)/.exec(buf);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    proc.on('exit', (code) => { clearTimeout(timer); reject(new Error(`ci serve exited (${code}):\n${buf}`)); });
  });
}

/** Stops the server (SIGTERM, waits for it) and starts it again on a new port. */
export async function restartServer(server, listen = []) {
  await stopServer(server, false);
  await launch(server, listen);
}

/** Starts a server stopped with `stopServer(server, false)` again, over the same store. */
export async function startAgain(server, listen = []) {
  await launch(server, listen);
}

export async function stopServer(server, clean = true) {
  if (server.proc && server.proc.exitCode === null) {
    const done = new Promise((r) => server.proc.once('exit', r));
    server.proc.kill('SIGTERM');
    await done;
  }
  if (clean) rmSync(server.dir, { recursive: true, force: true });
}

export function token(server, name, readOnly = false) {
  const out = execFileSync(ciBin(), ['--store', server.store, 'serve', 'token', 'create', name, ...(readOnly ? ['--read-only'] : [])], { encoding: 'utf8' });
  const m = /strata_[0-9a-f]+/.exec(out);
  if (!m) throw new Error(`no token in: ${out}`);
  return m[0];
}

export async function api(server, method, path, body, tok) {
  const res = await fetch(server.url + path, {
    method,
    headers: { ...(body ? { 'Content-Type': 'application/json' } : {}), ...(tok ? { Authorization: `Bearer ${tok}` } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/**
 * Waits until a run has ended, from its event stream (no sleeps). `feed`
 * listens to the global feed instead (no log lines: for runs with big logs);
 * it must be opened before the run starts.
 */
export function feedWaiter(server) {
  const ctl = new AbortController();
  const ended = new Map();
  const waiters = new Map();
  (async () => {
    const res = await fetch(`${server.url}/api/v1/events`, { signal: ctl.signal });
    const reader = res.body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, i); buf = buf.slice(i + 2);
        if (!/^event: ?run_finished$/m.test(block)) continue;
        const data = JSON.parse(block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n'));
        ended.set(data.run, true);
        waiters.get(data.run)?.();
      }
    }
  })().catch(() => {});
  return {
    async wait(id) {
      if (!ended.has(id)) await new Promise((r) => waiters.set(id, r));
      return api(server, 'GET', `/api/v1/runs/${encodeURIComponent(id)}`);
    },
    close() { ctl.abort(); },
  };
}

export async function waitRun(server, id) {
  const res = await fetch(`${server.url}/api/v1/runs/${encodeURIComponent(id)}/events`);
  const reader = res.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    if (/^event: ?end$/m.test(buf)) { await reader.cancel(); break; }
  }
  return api(server, 'GET', `/api/v1/runs/${encodeURIComponent(id)}`);
}

export async function startRun(server, tok, ws, targets = []) {
  return (await api(server, 'POST', `/api/v1/workspaces/${encodeURIComponent(ws)}/runs`, { targets }, tok)).id;
}

export async function browser() {
  if (!existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: apt-get install -y chromium`);
  const profile = mkdtempSync(join(tmpdir(), 'strata-chromium-'));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    viewport: { width: 1440, height: 900 },
  });
  const errors = [];
  ctx.on('page', (p) => watch(p, errors));
  for (const p of ctx.pages()) watch(p, errors);
  return {
    ctx,
    errors,
    async page() { return ctx.newPage(); },
    async close() { await ctx.close(); rmSync(profile, { recursive: true, force: true }); },
  };
}

function watch(page, errors) {
  page.on('pageerror', (e) => errors.push(`page error: ${e.message}`));
  page.on('dialog', (d) => { errors.push(`dialog: ${d.message()}`); void d.dismiss(); });
  page.on('console', (m) => { if (m.type() === 'error' && /Content Security Policy/.test(m.text())) errors.push(`csp: ${m.text()}`); });
}

// bench/ui.sh's measurements: time to first full render and tab memory for a
// 1,000-task run and a 1,000,000-line log. Prints figures; asserts nothing.

import { startServer, stopServer, token, startRun, feedWaiter, browser } from './harness.mjs';

const N = Number(process.env.TASKS ?? 1000), LINES = Number(process.env.LINES ?? 1_000_000);
const stages = 10;
let star = '';
for (let s = 0; s < stages; s++) star += `stage(name = "s${s}"${s ? `, after = ["s${s - 1}"]` : ''})\n`;
for (let i = 0; i < N; i++) {
  const st = Math.floor((i * stages) / N);
  const deps = [i - 1, i - 7, i - 31].filter((d) => d >= 0 && Math.floor((d * stages) / N) <= st).map((d) => `":t${d}"`);
  star += `task(name = "t${i}", ${deps.length ? `deps = [${deps.join(', ')}], ` : ''}script = "echo ${i} > out", stage = "s${st}")\n`;
}
star += `task(name = "biglog", script = "seq 1 ${LINES}; printf '\\\\033[32mdone\\\\033[0m\\\\n'")\n`;

const srv = await startServer([{ name: 'bench', files: { 'ci.toml': '[build]\nexecutor = "host"\n', 'BUILD.star': star } }]);
const tok = token(srv, 'bench');
srv.proc.on('exit', (c, s) => console.error('ci serve exited', c, s, srv.stderr.slice(-3000)));
const t0 = Date.now();
const feed = feedWaiter(srv);
await new Promise((r) => setTimeout(r, 300)); // the feed is live only: let it connect
const run = await feed.wait(await startRun(srv, tok, 'bench', ['//:all']));
feed.close();
console.log(`build of ${N + 1} tasks: ${run.state} in ${((Date.now() - t0) / 1000).toFixed(1)} s (server side ${run.duration_ms} ms)`);

const b = await browser();
const p = await b.page();
const cdp = await p.context().newCDPSession(p);
await cdp.send('Performance.enable');
const metrics = async () => {
  await cdp.send('HeapProfiler.collectGarbage').catch(() => {});
  const m = Object.fromEntries((await cdp.send('Performance.getMetrics')).metrics.map((x) => [x.name, x.value]));
  return `JS heap ${(m.JSHeapUsedSize / 2 ** 20).toFixed(1)} MiB, ${m.Nodes} DOM nodes`;
};

let start = Date.now();
await p.goto(`${srv.url}/runs/${encodeURIComponent(run.id)}`);
await p.waitForFunction((n) => document.querySelectorAll('g.node.st-succeeded, g.node.st-cached').length >= n, N, { timeout: Number(process.env.T ?? 120_000), polling: 50 })
  .catch(async (e) => { console.log('nodes:', await p.locator('g.node').count(), b.errors, (await p.locator('main').textContent()).slice(0, 600)); throw e; });
console.log(`run view, ${N} tasks: first full render ${Date.now() - start} ms; ${await metrics()}`);
start = Date.now();
await p.fill('.graph-search', 't999');
await p.waitForFunction(() => document.querySelectorAll('g.node.match').length >= 1);
console.log(`  search a label: ${Date.now() - start} ms`);
start = Date.now();
await p.getByRole('button', { name: 'Collapse all' }).click();
await p.waitForFunction(() => document.querySelectorAll('g.node').length === 0);
await p.getByRole('button', { name: 'Expand all' }).click();
await p.waitForFunction((n) => document.querySelectorAll('g.node').length >= n, N);
console.log(`  collapse and expand every stage: ${Date.now() - start} ms`);

start = Date.now();
await p.goto(`${srv.url}/runs/${encodeURIComponent(run.id)}?view=waterfall`);
await p.waitForFunction(() => document.querySelector('[data-testid="critical-path"]') && document.querySelectorAll('[data-testid="wf-row"]').length > 10, null, { timeout: 120_000, polling: 20 });
console.log(`waterfall, ${N + 1} tasks: rows and analysis ${Date.now() - start} ms; rows in the DOM: ${await p.locator('[data-testid="wf-row"]').count()}; ${await metrics()}`);
start = Date.now();
await p.mouse.move(900, 700); // over the waterfall's rows
for (let i = 0; i < 20; i++) await p.mouse.wheel(0, 2000);
await p.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
console.log(`  20 wheel scrolls: ${Date.now() - start} ms`);
start = Date.now();
await p.getByTestId('wf-only-critical').check();
await p.waitForFunction(() => [...document.querySelectorAll('[data-testid="wf-row"]')].every((r) => r.classList.contains('crit')));
console.log(`  only the critical path (${await p.locator('[data-testid="wf-row"]').count()} rows): ${Date.now() - start} ms`);

start = Date.now();
await p.goto(`${srv.url}/runs/${encodeURIComponent(run.id)}?task=${encodeURIComponent('//:biglog')}`);
await p.waitForFunction(() => document.querySelectorAll('.log-row').length > 10, null, { timeout: 120_000, polling: 20 });
const first = Date.now() - start;
await p.waitForFunction((n) => document.querySelector('[data-testid="log-info"]')?.textContent?.startsWith(n), (LINES + 1).toLocaleString('en-US'), { timeout: 300_000, polling: 100 });
console.log(`log of ${LINES + 1} lines: first lines ${first} ms, all loaded ${Date.now() - start} ms; ${await metrics()}`);
start = Date.now();
await p.fill('[data-testid="log-search"]', '500000');
await p.press('[data-testid="log-search"]', 'Enter');
await p.waitForFunction(() => document.querySelector('.log-row.marked')?.textContent?.includes('500000'));
console.log(`  search and jump to line 500000: ${Date.now() - start} ms; ${await metrics()}`);
start = Date.now();
for (let i = 0; i < 20; i++) await p.mouse.wheel(0, 4000);
await p.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))));
console.log(`  20 wheel scrolls: ${Date.now() - start} ms; rows in the DOM: ${await p.locator('.log-row').count()}`);
await b.close();
await stopServer(srv);

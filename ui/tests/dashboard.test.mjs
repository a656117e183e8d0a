// The dashboard in a real browser (Debian's Chromium through playwright-core)
// against a real `ci serve` with real builds. Waits are on the page's DOM
// and on the server's event streams, never on sleeps.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, rmSync, readdirSync, statSync, cpSync, unlinkSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { startServer, stopServer, startAgain, token, api, startRun, waitRun, browser, ciBin, repo } from './harness.mjs';

const HOSTILE = '<img src=x onerror=alert(1)>';
// A gate on 127.0.0.1 the `wait` task connects to and reads a line from (a
// host task's sandbox shows it no file of the test, but with `network = True`
// it reaches the host's loopback).
let gateConn;
const gateConnected = new Promise((resolve) => { gateConn = resolve; });
const gate = createServer((sock) => gateConn(sock));
await new Promise((resolve) => gate.listen(0, '127.0.0.1', resolve));
const gatePort = gate.address().port;

// A workspace whose tasks write hostile names, contents and logs, and one
// task that waits on the gate (so "running" lasts exactly as long as the
// test wants).
const hostileWs = {
  name: 'hostile',
  files: {
    'ci.toml': '[build]\nexecutor = "host"\n',
    'BUILD.star': `
stage(name = "build")
task(
    name = "files",
    script = """
printf 'line one\\nsecond line: caf\\xc3\\xa9 \\xe2\\x9c\\x93\\n' > plain.txt
printf '%s\\n' '${HOSTILE}' '<script>alert(2)</script>' > '${HOSTILE}.txt'
mkdir -p 'dir <b onmouseover=alert(5)>'
printf 'inside\\n' > 'dir <b onmouseover=alert(5)>/x.html'
printf '<html><body><script>alert(3)</script></body></html>\\n' > page.html
""",
    stage = "build",
)
task(
    name = "noisy",
    script = """
printf '%s\\n' '${HOSTILE}'
printf '\\033[31mred text\\033[0m and \\033[1;32mbold green\\033[0m\\n'
printf '\\033]0;evil title\\007after osc\\n'
printf '\\033]8;;javascript:alert(4)\\033\\\\\\\\click me\\033]8;;\\033\\\\\\\\\\n'
printf 'cursor\\033[2J\\033[Hmoves\\n'
printf 'bell\\007 and nul-free controls\\n'
""",
    stage = "build",
)
task(
    name = "wait",
    script = 'echo started; x=$(bash -c "exec 3<>/dev/tcp/127.0.0.1/${gatePort}; head -n1 <&3"); echo "released: $x"',
    pure = False,
    network = True,
    stage = "build",
)
`,
  },
};

// Two sources, each with its own cone, and an impure task at the end: a
// change to `a/x.txt` re-runs the cone of `//:a`, the cone of `//:b` comes
// from the cache, `//:stamp` runs every time.
const predictWs = {
  name: 'predict',
  files: {
    'ci.toml': '[build]\nexecutor = "host"\n',
    'a/x.txt': 'one\n',
    'b/y.txt': 'two\n',
    'BUILD.star': `
local_source(name = "a", path = "a")
local_source(name = "b", path = "b")
task(name = "ca", deps = {"a": ":a"}, script = 'tr a-z A-Z < "$CI_IN/a/x.txt" > ca.txt')
task(name = "cb", deps = {"b": ":b"}, script = 'tr a-z A-Z < "$CI_IN/b/y.txt" > cb.txt')
task(name = "link", deps = {"a": ":ca", "b": ":cb"}, script = 'cat "$CI_IN/a/ca.txt" "$CI_IN/b/cb.txt" > all.txt')
task(name = "docs", deps = {"b": ":cb"}, script = 'cp "$CI_IN/b/cb.txt" doc.txt')
task(name = "stamp", deps = {"l": ":link"}, script = 'date +%s%N > stamp.txt', pure = False)
`,
  },
};

// A run with one slow task on a chain and fast ones beside it.
const timingWs = {
  name: 'timing',
  files: {
    'ci.toml': '[build]\nexecutor = "host"\njobs = 4\n',
    'src/a.txt': 'a\n',
    'BUILD.star': `
local_source(name = "src", path = "src")
task(name = "slow", deps = [":src"], script = 'sleep 1.5; cp "$CI_IN/src/a.txt" slow.txt')
task(name = "fast1", deps = [":src"], script = 'echo 1 > f1')
task(name = "fast2", deps = [":src"], script = 'echo 2 > f2')
task(name = "after_slow", deps = {"s": ":slow"}, script = 'cp "$CI_IN/s/slow.txt" x')
task(name = "join", deps = {"a": ":after_slow", "b": ":fast1", "c": ":fast2"}, script = 'echo > j')
`,
  },
};

let srv, b, write, readOnly;

before(async () => {
  srv = await startServer(['hello', hostileWs, 'cproject', predictWs, timingWs]);
  write = token(srv, 'ui-test');
  readOnly = token(srv, 'ui-reader', true);
  b = await browser();
});

after(async () => {
  await b?.close();
  if (srv) await stopServer(srv);
  gate.close();
});

async function page(tok) {
  const p = await b.page();
  if (tok) {
    await p.goto(srv.url + '/healthz');
    await p.evaluate((t) => sessionStorage.setItem('strata.token', t), tok);
  }
  return p;
}

const enc = encodeURIComponent;

function noErrors() {
  assert.deepEqual(b.errors, [], 'the page raised no error, dialog or CSP violation');
}

test('the server sends the page with a strict CSP; client routes fall back to it, /api never does', async () => {
  const res = await fetch(srv.url + '/runs/20990101T000000.000-abcd');
  assert.equal(res.status, 200);
  const csp = res.headers.get('content-security-policy');
  assert.match(csp, /script-src 'self'/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  assert.match(await res.text(), /<div id="app">/);
  const apiRes = await fetch(srv.url + '/api/v2/nothing');
  assert.equal(apiRes.status, 404);
  assert.equal(apiRes.headers.get('content-type'), 'application/json');
  assert.equal((await apiRes.json()).error.code, 'not_found');
  assert.equal((await fetch(srv.url + '/assets/missing.js')).status, 404);
});

test('the wall shows every workspace and its latest run as the API says', async () => {
  const run = await waitRun(srv, await startRun(srv, write, 'hello'));
  assert.equal(run.state, 'succeeded');
  const p = await page();
  await p.goto(srv.url + '/');
  const wss = await api(srv, 'GET', '/api/v1/workspaces');
  for (const w of wss) {
    const tile = p.getByTestId(`tile-${w.name}`);
    await tile.waitFor();
    const want = w.latest_state ?? 'none';
    await p.waitForFunction(([n, s]) => document.querySelector(`[data-testid="tile-${n}"] [data-testid="tile-state"]`)?.textContent === s, [w.name, want]);
  }
  await p.close();
  noErrors();
});

// The page's own clock an hour ahead: elapsed times must come from the
// server's clock (the events' at_ms), so they still read in seconds.
const SKEW_MS = 3_600_000;
async function skewClock(p) {
  await p.addInitScript((skew) => { const real = Date.now; Date.now = () => real() + skew; }, SKEW_MS);
}

test('a task goes from running to succeeded on screen without a reload, on the wall and in the run view', async () => {
  const wall = await page();
  await skewClock(wall);
  await wall.goto(srv.url + '/');
  await wall.getByTestId('tile-hostile').waitFor();
  await wall.waitForFunction(() => document.querySelector('[data-testid="feed-status"]')?.textContent?.includes('live'));
  const id = await startRun(srv, write, 'hostile', ['//:wait']);
  const p = await page();
  await skewClock(p);
  await p.goto(`${srv.url}/runs/${enc(id)}`);
  const node = p.locator('g.node[data-label="//:wait"]');
  await p.waitForFunction(() => document.querySelector('g.node[data-label="//:wait"]')?.classList.contains('st-running'));
  // Elapsed by the server's clock: seconds, not the hour the page's clock is ahead.
  await p.waitForFunction(() => /^running \d+(\.\d)? ?(ms|s)$/.test(document.querySelector('g.node[data-label="//:wait"] .node-detail')?.textContent ?? ''));
  assert.doesNotMatch(await p.getByTestId('run-state').locator('xpath=..').textContent(), / h /);
  // The waterfall draws it running, from its start on the server's clock.
  await p.getByTestId('view-waterfall').click();
  await p.waitForFunction(() => document.querySelector('[data-testid="wf-row"][data-label="//:wait"]')?.getAttribute('data-state') === 'running');
  assert.match(await p.locator('[data-testid="wf-row"][data-label="//:wait"] .wf-dur').textContent(), /^running \d+(\.\d)? ?(ms|s)$/);
  await p.getByTestId('view-graph').click();
  // The wall saw it start from the feed.
  await wall.waitForFunction((rid) => [...document.querySelectorAll('[data-testid="running-run"]')].some((e) => e.textContent.includes(rid)), id);
  await wall.waitForFunction(() => [...document.querySelectorAll('.running-tasks li')].some((li) => /\/\/:wait \d+(\.\d)? ?(ms|s)$/.test(li.textContent)));
  assert.doesNotMatch(await wall.locator('[data-testid="running-run"] .elapsed').first().textContent(), /h|m /);
  await wall.waitForFunction(() => document.querySelector('[data-testid="tile-hostile"] [data-testid="tile-state"]')?.textContent === 'running');
  // Release the task; the page changes by itself.
  const sock = await gateConnected;
  sock.end('go\n');
  await p.waitForFunction(() => document.querySelector('g.node[data-label="//:wait"]')?.classList.contains('st-succeeded'));
  await p.waitForFunction(() => document.querySelector('[data-testid="run-state"]')?.textContent === 'succeeded');
  await wall.waitForFunction(() => document.querySelector('[data-testid="tile-hostile"] [data-testid="tile-state"]')?.textContent === 'succeeded');
  // Its log, as the API has it.
  await p.locator('g.node[data-label="//:wait"]').click();
  await p.waitForFunction(() => document.querySelector('[data-testid="log"]')?.textContent?.includes('released: go'));
  await p.close();
  await wall.close();
  noErrors();
});

test('the file browser shows a task output byte for byte, hostile names as text', async () => {
  const run = await waitRun(srv, await startRun(srv, write, 'hostile', ['//:files']));
  assert.equal(run.state, 'succeeded');
  const layer = run.tasks['//:files'].output;
  const p = await page();
  await p.goto(`${srv.url}/runs/${enc(run.id)}?task=${enc('//:files')}&tab=files`);
  const list = p.getByTestId('file-list');
  await list.locator('a[data-path="plain.txt"]').waitFor();
  for (const name of ['plain.txt', `${HOSTILE}.txt`, 'page.html']) {
    await list.locator(`a[data-path="${name.replace(/"/g, '\\"')}"]`).click();
    const want = Buffer.from(await (await fetch(`${srv.url}/api/v1/layers/${layer}/file/${enc(name)}`)).arrayBuffer()).toString('utf8');
    await p.waitForFunction((w) => document.querySelector('[data-testid="file-text"]')?.textContent === w, want);
  }
  assert.equal(await p.locator('img').count(), 0, 'no <img> came out of a file name or content');
  assert.equal(await p.locator('#app script').count(), 0);
  // A directory with markup in its name.
  await list.locator('a[data-path="dir <b onmouseover=alert(5)>"]').click();
  await list.locator('a[data-path="dir <b onmouseover=alert(5)>/x.html"]').click();
  await p.waitForFunction(() => document.querySelector('[data-testid="file-text"]')?.textContent === 'inside\n');
  assert.equal(await p.locator('#app b').count(), 0);
  await p.close();
  noErrors();
});

test('logs with markup and ANSI/OSC escapes render as text, colours as classes', async () => {
  const run = await waitRun(srv, await startRun(srv, write, 'hostile', ['//:noisy']));
  const p = await page();
  await p.goto(`${srv.url}/runs/${enc(run.id)}?task=${enc('//:noisy')}`);
  const log = p.getByTestId('log');
  await p.waitForFunction((h) => document.querySelector('[data-testid="log"]')?.textContent?.includes(h), HOSTILE);
  const text = await log.textContent();
  assert.ok(text.includes('red text and bold green'));
  assert.ok(text.includes('after osc') && !text.includes('evil title'), 'an OSC title is dropped');
  assert.ok(text.includes('click me') && !text.includes('javascript'), 'an OSC 8 link keeps its text, never its target');
  assert.ok(text.includes('cursormoves'));
  assert.ok(!text.includes('\x1b'), 'no escape byte reaches the page');
  assert.equal(await p.locator('[data-testid="log"] a, img').count(), 0);
  assert.equal(await log.locator('span.f1', { hasText: 'red text' }).count(), 1);
  assert.equal(await log.locator('span.f2.ab', { hasText: 'bold green' }).count(), 1);
  await p.close();
  noErrors();
});

test('the diff view shows a known change against the task\u2019s previous output', async () => {
  const ws = srv.roots[0]; // hello
  const first = await waitRun(srv, await startRun(srv, write, 'hello'));
  writeFileSync(join(ws, 'src', 'name.txt'), 'mars\n');
  const second = await waitRun(srv, await startRun(srv, write, 'hello'));
  assert.notEqual(first.tasks['//:greeting'].output, second.tasks['//:greeting'].output);
  const p = await page();
  await p.goto(`${srv.url}/runs/${enc(second.id)}?task=${enc('//:greeting')}&tab=diff`);
  const changes = p.getByTestId('diff-changes');
  await changes.waitFor();
  assert.match(await changes.textContent(), /modified\s*share\/hello\.txt/);
  await changes.locator('a[data-path="share/hello.txt"]').click();
  await p.waitForFunction(() => document.querySelector('[data-testid="file-diff"]')?.textContent?.includes('+ Hello, MARS!'));
  assert.match(await p.getByTestId('file-diff').textContent(), /- Hello, WORLD!/);
  writeFileSync(join(ws, 'src', 'name.txt'), 'world\n');
  // Why it ran: the input that changed, down to its path.
  await p.goto(`${srv.url}/runs/${enc(second.id)}?task=${enc('//:greeting')}&tab=why`);
  await p.waitForFunction(() => document.querySelector('[data-testid="explain-changes"]')?.textContent?.includes('name.txt'));
  await p.close();
  noErrors();
});

test('history lists the runs the API lists, with their hit ratios; two runs compare', async () => {
  const page1 = await api(srv, 'GET', '/api/v1/runs?workspace=hello');
  const p = await page();
  await p.goto(`${srv.url}/runs?workspace=hello`);
  await p.getByTestId('runs-table').waitFor();
  await p.waitForFunction((n) => document.querySelectorAll('[data-testid="runs-table"] tbody tr').length === n, page1.runs.length);
  const ids = await p.locator('[data-testid="runs-table"] tbody tr').evaluateAll((rows) => rows.map((r) => r.getAttribute('data-run')));
  assert.deepEqual(ids, page1.runs.map((r) => r.id));
  await p.getByTestId('trend').waitFor();
  await p.locator(`tr[data-run="${page1.runs[0].id}"] input`).check();
  await p.locator(`tr[data-run="${page1.runs[1].id}"] input`).check();
  await p.getByTestId('compare').click();
  await p.getByTestId('compare-table').waitFor();
  await p.waitForFunction(() => document.querySelector('tr[data-label="//:greeting"]')?.textContent?.includes('action key changed'));
  await p.close();
  noErrors();
});

test('read-only and anonymous users get no action buttons; a write token starts, and the run shows', async () => {
  const done = (await api(srv, 'GET', '/api/v1/runs?workspace=hello&limit=1')).runs[0];
  for (const tok of [null, readOnly]) {
    const p = await page(tok);
    await p.goto(`${srv.url}/runs/${enc(done.id)}`);
    await p.getByTestId('run-state').waitFor();
    if (tok) await p.waitForFunction(() => document.querySelector('[data-testid="access"]')?.textContent?.includes('read-only'));
    assert.equal(await p.getByTestId('rerun').count(), 0);
    await p.goto(`${srv.url}/workspaces/hello`);
    await p.locator('g.node').first().waitFor();
    assert.equal(await p.getByTestId('start').count(), 0);
    await p.close();
  }
  const p = await page(write);
  await p.goto(`${srv.url}/workspaces/hello`);
  await p.getByTestId('start').click();
  await p.waitForURL(/\/runs\/[^/]+$/);
  await p.waitForFunction(() => document.querySelector('[data-testid="run-state"]')?.textContent === 'succeeded');
  assert.equal(await p.getByTestId('rerun').count(), 0, 'a run that succeeded has nothing to rerun');
  // The token lives in this tab's session only.
  assert.equal(await p.evaluate(() => localStorage.length), 0);
  await p.close();
  noErrors();
});

function graphJson(dir) {
  const out = JSON.parse(execFileSync(ciBin(), ['graph', '--json', '-C', dir], { encoding: 'utf8', env: { ...process.env, CI_STORE: join(dir, '.store') } }));
  for (const t of Object.values(out.tasks)) delete t.location;
  for (const s of Object.values(out.stages ?? {})) delete s.location;
  return { tasks: out.tasks, stages: out.stages ?? {} };
}

function buildFiles(dir, rel = '') {
  const out = [];
  for (const e of readdirSync(join(dir, rel))) {
    const r = rel ? `${rel}/${e}` : e;
    if (statSync(join(dir, r)).isDirectory()) out.push(...buildFiles(dir, r));
    else if (e === 'BUILD.star') out.push(r);
  }
  return out;
}

for (const fixture of ['hello', 'cproject']) {
  test(`the designer's BUILD.star export of fixtures/${fixture} loads to the same model`, async () => {
    const p = await page();
    await p.goto(`${srv.url}/designer/${fixture}`);
    await p.locator('[data-testid="designer-tasks"] li').first().waitFor();
    await p.getByTestId('export-star').click();
    await p.locator('.export-file').first().waitFor();
    const files = await p.locator('.export-file').evaluateAll((els) => els.map((e) => [e.getAttribute('data-file'), e.querySelector('pre').textContent]));
    const copy = mkdtempSync(join(tmpdir(), `strata-export-${fixture}-`));
    cpSync(join(repo, 'fixtures', fixture), copy, { recursive: true });
    for (const f of buildFiles(copy)) unlinkSync(join(copy, f));
    for (const [path, text] of files) writeFileSync(join(copy, path), text);
    try {
      assert.deepEqual(graphJson(copy), graphJson(join(repo, 'fixtures', fixture)));
    } finally {
      rmSync(copy, { recursive: true, force: true });
    }
    await p.close();
    noErrors();
  });
}

test('the designer flags a broken edit as you type', async () => {
  const graph = await api(srv, 'GET', '/api/v1/workspaces/hello/graph');
  const p = await page();
  await p.goto(`${srv.url}/designer/hello`);
  // The whole model is loaded (the list is redrawn until then), and the first check has answered.
  await p.waitForFunction((n) => document.querySelectorAll('[data-testid="designer-tasks"] li').length === n, graph.order.length);
  await p.waitForFunction(() => /No problems found/.test(document.querySelector('[data-testid="problems"]')?.textContent ?? '')
    && !/checking with the server/.test(document.querySelector('[data-testid="problems"]')?.textContent ?? ''));
  await p.locator('[data-testid="designer-tasks"] li a', { hasText: '//:test' }).click();
  await p.waitForFunction(() => document.querySelector('[data-testid="task-json"]')?.value.includes('//:test'));
  const json = p.getByTestId('task-json');
  await p.locator('details', { has: json }).locator('summary').click();
  await json.waitFor({ state: 'visible' });
  const value = JSON.parse(await json.inputValue());
  value.deps = [{ mount: 'app', label: '//:nowhere' }];
  await json.fill(JSON.stringify(value));
  await p.waitForFunction(() => document.querySelector('[data-testid="problems"]')?.textContent?.includes('//:nowhere'));
  await p.close();
  noErrors();
});

test('the workspace view\u2019s predictions match what the run started from the page then does', async () => {
  const ws = srv.roots[3]; // predict
  const first = await waitRun(srv, await startRun(srv, write, 'predict'));
  assert.equal(first.state, 'succeeded');
  writeFileSync(join(ws, 'a', 'x.txt'), 'uno\n');
  const graph = await api(srv, 'GET', '/api/v1/workspaces/predict/graph');
  const p = await page(write);
  await p.goto(`${srv.url}/workspaces/predict`);
  // Every task of the pipeline gets a prediction on the page.
  await p.waitForFunction((n) => document.querySelectorAll('[data-testid="prediction"]').length === n, graph.order.length);
  const said = Object.fromEntries(await p.locator('[data-testid="prediction"]').evaluateAll((els) =>
    els.map((e) => [e.getAttribute('data-label'), e.querySelector('[data-testid="prediction-text"]').textContent])));
  assert.deepEqual(Object.keys(said).sort(), [...graph.order].sort());
  for (const [l, text] of Object.entries(said)) assert.match(text, /^(will be cached|will run: .+)$/, `${l}: ${text}`);
  // The graph's nodes carry the same words.
  for (const l of graph.order) {
    const title = await p.locator(`g.node[data-label="${l}"] title`).textContent();
    assert.ok(title.includes(said[l]), `${l}: the node says ${title}, the list ${said[l]}`);
  }
  // The changed source's cone will run, each for a reason that names the change.
  assert.match(said['//:a'], /^will run: .*changed/);
  assert.match(said['//:ca'], /^will run: .*`\/\/:a`/);
  assert.match(said['//:link'], /^will run: .*`\/\/:ca`/);
  assert.match(said['//:stamp'], /^will run: /);
  for (const l of ['//:b', '//:cb', '//:docs']) assert.equal(said[l], 'will be cached', l);
  // Start the run from the page; what came from the cache is what the page said.
  await p.getByTestId('start').click();
  await p.waitForURL(/\/runs\/[^/?]+/);
  const id = decodeURIComponent(new URL(p.url()).pathname.split('/').pop());
  const run = await waitRun(srv, id);
  assert.equal(run.state, 'succeeded');
  const cached = Object.entries(run.tasks).filter(([, t]) => t.cached).map(([l]) => l).sort();
  const predicted = Object.entries(said).filter(([, t]) => t === 'will be cached').map(([l]) => l).sort();
  assert.deepEqual(cached, predicted);
  assert.deepEqual(Object.keys(run.tasks).sort(), Object.keys(said).sort(), 'the run built what was predicted');
  await p.waitForFunction(() => document.querySelector('[data-testid="run-state"]')?.textContent === 'succeeded');
  writeFileSync(join(ws, 'a', 'x.txt'), 'one\n');
  await p.close();
  noErrors();
});

test('the waterfall shows the critical path the analysis endpoint returns, the slow task on it', async () => {
  const run = await waitRun(srv, await startRun(srv, write, 'timing'));
  assert.equal(run.state, 'succeeded');
  const analysis = await api(srv, 'GET', `/api/v1/runs/${enc(run.id)}/analysis`);
  const want = analysis.critical_path.map((s) => s.label);
  assert.ok(want.includes('//:slow'), `the slow task is on the critical path: ${want}`);
  const p = await page();
  await p.goto(`${srv.url}/runs/${enc(run.id)}`);
  await p.getByTestId('view-waterfall').click();
  await p.waitForURL(/view=waterfall/);
  await p.waitForFunction((n) => document.querySelectorAll('[data-testid="wf-row"]').length === n, Object.keys(run.tasks).length);
  await p.waitForFunction((n) => document.querySelectorAll('[data-testid="wf-row"].crit').length === n, want.length);
  const rows = await p.locator('[data-testid="wf-row"].crit').evaluateAll((els) => els.map((e) => e.getAttribute('data-label')));
  assert.deepEqual(rows.sort(), [...want].sort());
  // The chain in words, in order.
  const chain = await p.locator('[data-testid="critical-path"] a[data-label]').evaluateAll((els) => els.map((e) => e.getAttribute('data-label')));
  assert.deepEqual(chain, want);
  // The slow task's bar is the longest, and starts after its source ended.
  const width = async (l) => (await p.locator(`[data-testid="wf-row"][data-label="${l}"] .wf-bar`).boundingBox()).width;
  const slow = await width('//:slow');
  for (const l of ['//:fast1', '//:fast2', '//:after_slow', '//:join']) assert.ok(slow > 4 * await width(l), `//:slow is longer than ${l}`);
  // The figures in words.
  const par = await p.getByTestId('analysis-parallelism').textContent();
  assert.ok(par.includes(analysis.parallelism.toFixed(1)), par);
  assert.match(await p.getByTestId('analysis-never-cached').textContent(), /None/);
  assert.match(await p.getByTestId('analysis-impure').textContent(), /None/);
  // "Only the critical path" keeps its rows; a row opens the task panel.
  await p.getByTestId('wf-only-critical').check();
  await p.waitForFunction((n) => document.querySelectorAll('[data-testid="wf-row"]').length === n, want.length);
  await p.locator('[data-testid="wf-row"][data-label="//:slow"]').click();
  await p.waitForURL(/task=%2F%2F%3Aslow/);
  // The graph view marks the same nodes.
  await p.getByTestId('view-graph').click();
  await p.waitForFunction((n) => document.querySelectorAll('g.node.crit').length === n, want.length);
  const nodes = await p.locator('g.node.crit').evaluateAll((els) => els.map((e) => e.getAttribute('data-label')));
  assert.deepEqual(nodes.sort(), [...want].sort());
  await p.close();
  noErrors();
});

test('the wall recovers by itself when the server restarts', async () => {
  const port = new URL(srv.url).port;
  const p = await page();
  await p.goto(srv.url + '/');
  await p.waitForFunction(() => document.querySelector('[data-testid="feed-status"]')?.textContent?.includes('live'));
  await stopServer(srv, false);
  // The page saw the server go, before it comes back (else "live" below could be the old connection).
  await p.waitForFunction(() => document.querySelector('[data-testid="feed-status"]')?.textContent?.includes('reconnecting'));
  await startAgain(srv, ['--listen', `127.0.0.1:${port}`]);
  // Reconnected, and a run started after the restart shows without a reload.
  await p.waitForFunction(() => document.querySelector('[data-testid="feed-status"]')?.textContent?.includes('live'), null, { timeout: 30_000 });
  const id = await startRun(srv, write, 'cproject', ['//build:objects']);
  await waitRun(srv, id);
  await p.waitForFunction(() => document.querySelector('[data-testid="tile-cproject"] [data-testid="tile-state"]')?.textContent === 'succeeded', null, { timeout: 30_000 });
  await p.close();
  noErrors();
});

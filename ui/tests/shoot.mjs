// Screenshots of each view for docs/ (run by hand: node tests/shoot.mjs OUTDIR).
import { startServer, stopServer, token, startRun, waitRun, browser, api } from './harness.mjs';
const out = process.argv[2] ?? '/tmp/shots';
import { mkdirSync } from 'node:fs';
mkdirSync(out, { recursive: true });
const srv = await startServer(['hello', 'cproject']);
const tok = token(srv, 'shots');
const r1 = await waitRun(srv, await startRun(srv, tok, 'hello'));
const r2 = await waitRun(srv, await startRun(srv, tok, 'cproject'));
console.log(r1.state, r2.state, srv.url);
const b = await browser();
const p = await b.page();
const shot = async (path, name, f) => {
  await p.goto(srv.url + path);
  await p.waitForTimeout(800);
  if (f) await f();
  await p.screenshot({ path: `${out}/${name}.png` });
};
await shot('/', 'wall');
await shot('/tv', 'tv');
await shot(`/runs/${r2.id}`, 'run');
await shot(`/runs/${r2.id}?task=${encodeURIComponent('//build:objects')}`, 'task-log');
await shot(`/runs/${r2.id}?task=${encodeURIComponent('//release:dist')}&tab=files`, 'task-files');
await shot('/runs', 'history');
await shot('/designer/cproject', 'designer');
await shot('/workspaces/cproject', 'workspace');
console.log(b.errors.join('\n'));
await b.close();
await stopServer(srv);

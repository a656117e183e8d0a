// Screenshots of each view for docs/ (by hand: node tests/shoot.mjs OUTDIR).
import { writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, stopServer, token, startRun, waitRun, browser } from './harness.mjs';

const out = process.argv[2] ?? '/tmp/shots';
mkdirSync(out, { recursive: true });
const colours = {
  name: 'colours',
  files: {
    'ci.toml': '[build]\nexecutor = "host"\n',
    'BUILD.star': `task(name = "compile", script = """
for i in $(seq 1 40); do printf '\\\\033[32m  CC\\\\033[0m src/unit_%02d.c\\\\n' $i; done
printf '\\\\033[33mwarning:\\\\033[0m unused variable \\\\033[1mtmp\\\\033[0m in unit_07.c\\\\n'
printf '\\\\033[1;32mok\\\\033[0m 40 units\\\\n'
mkdir -p bin && echo binary > bin/app
""")\n`,
  },
};
const timing = {
  name: 'timing',
  files: {
    'ci.toml': '[build]\nexecutor = "host"\njobs = 3\n',
    'src/a.txt': 'a\n',
    'BUILD.star': `
local_source(name = "src", path = "src")
task(name = "fetch_deps", deps = [":src"], script = 'sleep 0.4; echo deps > d')
task(name = "compile", deps = {"src": ":src", "deps": ":fetch_deps"}, script = 'sleep 1.2; echo o > o')
task(name = "lint", deps = [":src"], script = 'sleep 0.3; echo ok > l')
task(name = "docs", deps = [":src"], script = 'sleep 0.5; echo d > d')
task(name = "unit_tests", deps = {"o": ":compile"}, script = 'sleep 0.6; echo ok > t')
task(name = "integration", deps = {"o": ":compile"}, script = 'sleep 0.9; echo ok > t')
task(name = "package", deps = {"o": ":compile", "d": ":docs"}, script = 'sleep 0.2; echo p > p')
task(name = "upload", deps = {"p": ":package", "t": ":integration", "u": ":unit_tests"}, script = 'sleep 0.3; echo up', pure = False)
`,
  },
};
const srv = await startServer(['hello', 'cproject', colours, timing]);
const tok = token(srv, 'shots');
await waitRun(srv, await startRun(srv, tok, 'hello'));
await waitRun(srv, await startRun(srv, tok, 'cproject'));
await waitRun(srv, await startRun(srv, tok, 'colours'));
const cached = await waitRun(srv, await startRun(srv, tok, 'cproject'));
const timed = await waitRun(srv, await startRun(srv, tok, 'timing'));
writeFileSync(join(srv.roots[0], 'src', 'name.txt'), 'mars\n');
const failed = await waitRun(srv, await startRun(srv, tok, 'hello'));
writeFileSync(join(srv.roots[1], 'src', 'README.txt'), 'A changed README.\n');
const col = (await (await fetch(`${srv.url}/api/v1/runs?workspace=colours`)).json()).runs[0];
const b = await browser();
const p = await b.page();
await p.goto(srv.url + '/healthz');
await p.evaluate((t) => sessionStorage.setItem('strata.token', t), tok);
const shot = async (path, name, size = { width: 1440, height: 900 }, ready = null) => {
  await p.setViewportSize(size);
  await p.goto(srv.url + path);
  if (ready) await p.waitForSelector(ready);
  await p.waitForTimeout(1200);
  await p.screenshot({ path: `${out}/${name}.png` });
};
await shot('/', 'dashboard-wall');
await shot('/tv', 'dashboard-tv', { width: 1920, height: 1080 });
await shot(`/runs/${cached.id}`, 'dashboard-run');
await shot(`/runs/${col.id}?task=${encodeURIComponent('//:compile')}`, 'dashboard-log');
await shot(`/runs/${cached.id}?task=${encodeURIComponent('//release:dist')}&tab=files`, 'dashboard-files');
await shot(`/runs/${failed.id}?task=${encodeURIComponent('//:greeting')}&tab=diff`, 'dashboard-diff');
await shot('/runs', 'dashboard-history');
await shot('/workspaces/cproject', 'dashboard-workspace', undefined, '[data-testid="prediction"]');
await shot(`/runs/${timed.id}?view=waterfall`, 'dashboard-waterfall', undefined, '[data-testid="critical-path"]');
await shot(`/runs/${timed.id}?view=waterfall&task=${encodeURIComponent('//:compile')}`, 'dashboard-waterfall-task', undefined, '[data-testid="critical-path"]');
await shot('/designer/cproject', 'dashboard-designer');
console.log(b.errors.join('\n'));
await b.close();
await stopServer(srv);

import './style.css';
import { h, fill } from './dom';
import { refreshAccess, tokenControl } from './auth';
import { onFeedStatus } from './feed';
import { wallView } from './views/wall';
import { runView } from './views/run';
import { historyView, compareView } from './views/history';
import { workspaceView } from './views/workspace';
import { designerView } from './views/designer';

export type Cleanup = () => void;
export type View = (root: HTMLElement, params: Record<string, string>, query: URLSearchParams) => Cleanup | void;

const routes: [RegExp, View, string[]][] = [
  [/^\/$/, wallView, []],
  [/^\/tv\/?$/, (r, p) => wallView(r, { ...p, tv: '1' }), []],
  [/^\/runs\/?$/, historyView, []],
  [/^\/runs\/([^/]+)\/?$/, runView, ['id']],
  [/^\/compare\/([^/]+)\/([^/]+)\/?$/, compareView, ['a', 'b']],
  [/^\/workspaces\/([^/]+)\/?$/, workspaceView, ['ws']],
  [/^\/designer\/?$/, designerView, []],
  [/^\/designer\/([^/]+)\/?$/, designerView, ['ws']],
];

const app = document.getElementById('app')!;
const main = h('main', { id: 'main' });
const status = h('span', { class: 'feed-status', 'data-testid': 'feed-status' });
const header = h('header', { class: 'chrome' },
  h('a', { href: '/', class: 'brand', 'data-link': '' }, 'Strata'),
  h('nav', null,
    h('a', { href: '/', 'data-link': '' }, 'Wall'),
    h('a', { href: '/runs', 'data-link': '' }, 'Runs'),
    h('a', { href: '/designer', 'data-link': '' }, 'Designer'),
    h('a', { href: '/tv', 'data-link': '' }, 'TV')),
  h('span', { class: 'spacer' }),
  status,
  tokenControl());
app.append(header, main);

onFeedStatus((up, why) => {
  status.textContent = up ? '● live' : `○ reconnecting${why ? ` (${why})` : ''}`;
  status.className = `feed-status ${up ? 'up' : 'down'}`;
});

let cleanup: Cleanup | void;

import { navigate } from './nav';

function render(): void {
  if (cleanup) cleanup();
  cleanup = undefined;
  const path = location.pathname;
  const query = new URLSearchParams(location.search);
  const tv = path.startsWith('/tv') || query.has('tv');
  document.body.classList.toggle('tv', tv);
  for (const [re, view, names] of routes) {
    const m = re.exec(path);
    if (!m) continue;
    const params: Record<string, string> = {};
    names.forEach((n, i) => { params[n] = decodeURIComponent(m[i + 1]); });
    fill(main);
    for (const a of header.querySelectorAll('nav a')) {
      a.classList.toggle('active', a.getAttribute('href') === path || (a.getAttribute('href') !== '/' && path.startsWith(a.getAttribute('href')!)));
    }
    cleanup = view(main, params, query);
    return;
  }
  fill(main, h('section', { class: 'panel' }, h('h1', null, 'Not found'), h('p', null, 'No page at ', h('code', null, path), '.')));
}

// Links marked data-link navigate inside the page.
document.addEventListener('click', (e) => {
  const a = (e.target as Element).closest('a[data-link]') as HTMLAnchorElement | null;
  if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.button !== 0) return;
  e.preventDefault();
  navigate(a.getAttribute('href')!);
});
window.addEventListener('popstate', render);

void refreshAccess();
render();

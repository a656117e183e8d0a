// Who the user is to this server: the token typed once per browser session
// (kept in sessionStorage, nowhere else) and what it may do, as
// `GET /api/v1/whoami` says. Buttons that change something are drawn only
// for a write token.

import { setToken, token, whoami, type Access } from './api';
import { h } from './dom';

let current: Access = 'anonymous';
let name: string | null = null;
let readsNeedToken = false;
const listeners = new Set<(a: Access) => void>();

export function currentAccess(): Access { return current; }

export async function refreshAccess(): Promise<Access> {
  try {
    const w = await whoami();
    current = w.access;
    name = w.name;
    readsNeedToken = w.auth === 'all';
  } catch {
    current = token() ? 'invalid' : 'anonymous';
    name = null;
  }
  listeners.forEach((f) => f(current));
  return current;
}

export function onAccess(f: (a: Access) => void): () => void {
  listeners.add(f);
  return () => listeners.delete(f);
}

export function canWrite(): boolean { return current === 'write'; }

/** The chrome's sign-in control: a button, or a small form for the token. */
export function tokenControl(): HTMLElement {
  const box = h('span', { class: 'token' });
  const draw = () => {
    box.replaceChildren();
    if (token()) {
      const who = name ? ` (${name})` : '';
      const what = { write: `token${who}: can start runs`, 'read-only': `token${who}: read-only`, invalid: 'token refused', anonymous: '' }[current];
      box.append(
        h('span', { class: `who who-${current}`, 'data-testid': 'access' }, what),
        h('button', { class: 'small', onclick: (() => { setToken(null); void refreshAccess(); }) as EventListener }, 'Forget token'));
      return;
    }
    const input = h('input', { type: 'password', placeholder: 'API token', autocomplete: 'off', 'aria-label': 'API token', 'data-testid': 'token-input' });
    const form = h('form', { class: 'token-form' }, input, h('button', { type: 'submit', class: 'small' }, 'Use token'));
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      if (input.value.trim()) {
        setToken(input.value.trim());
        void refreshAccess();
      }
    });
    if (readsNeedToken) box.append(h('span', { class: 'who who-read-only', 'data-testid': 'access' }, 'this server needs a token to read'));
    box.append(form);
  };
  onAccess(draw);
  draw();
  return box;
}

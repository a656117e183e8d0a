// Who the user is to this server: the token typed once per browser session
// (kept in sessionStorage, nowhere else) and what it may do. Buttons that
// change something are drawn only for a write token.

import { access, setToken, token, type Access } from './api';
import { h } from './dom';

let current: Access = 'anonymous';
const listeners = new Set<(a: Access) => void>();

export function currentAccess(): Access { return current; }

export async function refreshAccess(): Promise<Access> {
  try { current = await access(); } catch { current = token() ? 'invalid' : 'anonymous'; }
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
      const what = { write: 'token: can start runs', 'read-only': 'token: read-only', invalid: 'token refused', anonymous: '' }[current];
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
    box.append(form);
  };
  onAccess(draw);
  draw();
  return box;
}

// The dashboard's only way to the server: `/api/v1`, as any client sees it.

export type State =
  | 'pending' | 'running' | 'succeeded' | 'failed' | 'skipped'
  | 'cancelled' | 'queued' | 'interrupted';

export interface Workspace {
  name: string;
  root: string;
  latest_run: string | null;
  latest_state: State | null;
}

export interface Edge { from: string; to: string; kind: 'input' | 'transform' | 'merge_base' | 'merge_side'; mount?: string }

export interface ModelTask {
  label: string;
  kind: Record<string, any>;
  deps?: { mount: string; label: string }[];
  transform?: string;
  stage?: string;
  location?: { file: string; line: number; col: number };
}

export interface Graph {
  workspace: string;
  order: string[];
  tasks: Record<string, ModelTask>;
  stages: Record<string, { name: string; after?: string[] }>;
  edges: Edge[];
  sources: { label: string; kind: string; trigger: string | null }[];
}

export interface Trigger { kind: string; source?: string; detail?: string; by?: string }

export interface RunSummary {
  id: string;
  state: State;
  workspace: string | null;
  targets: string[];
  started_ms: number;
  duration_ms: number;
  tasks: number;
  executed: number;
  cached: number;
  failed: number;
  skipped: number;
  rerun_of: string | null;
  trigger: Trigger | null;
}

export interface TaskRecord {
  state: State;
  cached: boolean;
  reused: boolean;
  key: string | null;
  output: string | null;
  log: string | null;
  exit_code: number | null;
  error: string | null;
  context?: Record<string, string>;
  started_ms: number;
  duration_ms: number;
  queued_ms: number;
  attempts: number;
}

export interface RunRecord {
  id: string;
  targets: string[];
  state: State;
  started_ms: number;
  duration_ms: number;
  rerun_of: string | null;
  tasks: Record<string, TaskRecord>;
  workspace?: string;
  trigger?: Trigger;
}

export interface Explain {
  label: string;
  key: string;
  output: string;
  run: string;
  has_previous: boolean;
  changes: string[];
  preimage: Record<string, any>;
}

export interface TreeEntry {
  name: string;
  kind: 'file' | 'dir' | 'symlink';
  size: number | null;
  executable: boolean | null;
  digest: string | null;
  target: string | null;
}

export interface Listing { layer: string; path: string; entries: TreeEntry[]; truncated: boolean }
export interface LayerDiff { from: string; to: string; changes: { path: string; change: string; old_kind: string | null; new_kind: string | null }[] }
export interface Prediction { will_cache: boolean; reason: string | null; key?: string | null; changed_paths?: string[] }
export interface Plan { tasks: Record<string, Prediction> }

export interface Analysis {
  run: string;
  duration_ms: number;
  critical_path: { label: string; duration_ms: number; cached: boolean; state: State }[];
  critical_ms: number;
  parallelism: number;
  levels: { level: number; tasks: number; executed: number; duration_ms: number }[];
  never_cached: { label: string; runs: number }[];
  impure_on_critical_path: string[];
  unknown_tasks: string[];
  traced?: boolean;
}

/** An answer that was not 2xx: the server's `{"error": {code, message}}`. */
export class ApiError extends Error {
  constructor(public status: number, public code: string, message: string) {
    super(message);
  }
}

const TOKEN_KEY = 'strata.token';

/** The token the user gave this session (sessionStorage only: gone with the tab). */
export function token(): string | null {
  try {
    return sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function setToken(t: string | null): void {
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export function headers(extra: Record<string, string> = {}): Record<string, string> {
  const t = token();
  return t ? { ...extra, Authorization: `Bearer ${t}` } : extra;
}

export const enc = encodeURIComponent;

async function fail(res: Response): Promise<never> {
  let code = 'http', message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body?.error) {
      code = String(body.error.code);
      message = String(body.error.message);
    }
  } catch { /* not JSON */ }
  throw new ApiError(res.status, code, message);
}

export async function raw(path: string, init: RequestInit = {}): Promise<Response> {
  const res = await fetch(`/api/v1${path}`, {
    ...init,
    headers: { ...headers(), ...(init.headers as Record<string, string> | undefined) },
  });
  if (!res.ok) await fail(res);
  return res;
}

export async function get<T>(path: string, signal?: AbortSignal): Promise<T> {
  return (await raw(path, { signal })).json() as Promise<T>;
}

export async function post<T>(path: string, body: unknown): Promise<T> {
  const res = await raw(path, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  return res.json() as Promise<T>;
}

export type Access = 'anonymous' | 'read-only' | 'write' | 'invalid';

export interface WhoAmI { name: string | null; access: 'anonymous' | 'read' | 'write'; auth: 'writes' | 'all' }

/** What the current token may do, as `GET /api/v1/whoami` says (401: a token it refuses). */
export async function whoami(): Promise<{ access: Access; name: string | null; auth: WhoAmI['auth'] | null }> {
  try {
    const w = await get<WhoAmI>('/whoami');
    return { access: w.access === 'read' ? 'read-only' : w.access, name: w.name, auth: w.auth };
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) return { access: token() ? 'invalid' : 'anonymous', name: null, auth: null };
    throw e;
  }
}

export const api = {
  workspaces: () => get<Workspace[]>('/workspaces'),
  graph: (ws: string) => get<Graph>(`/workspaces/${enc(ws)}/graph`),
  explain: (ws: string, label: string) => get<Explain>(`/workspaces/${enc(ws)}/explain/${enc(label)}`),
  plan: (ws: string, targets: string[]) =>
    get<Plan>(`/workspaces/${enc(ws)}/plan${targets.length ? `?targets=${enc(targets.join(','))}` : ''}`),
  runs: (q: Record<string, string | number | undefined>) => {
    const qs = Object.entries(q).filter(([, v]) => v !== undefined && v !== '')
      .map(([k, v]) => `${k}=${enc(String(v))}`).join('&');
    return get<{ runs: RunSummary[]; next: string | null }>(`/runs${qs ? `?${qs}` : ''}`);
  },
  run: (id: string) => get<RunRecord>(`/runs/${enc(id)}`),
  analysis: (id: string) => get<Analysis>(`/runs/${enc(id)}/analysis`),
  start: (ws: string, targets: string[]) => post<{ id: string }>(`/workspaces/${enc(ws)}/runs`, { targets }),
  cancel: (id: string) => post<{ id: string; cancelled: boolean }>(`/runs/${enc(id)}/cancel`, {}),
  rerun: (id: string) => post<{ id: string }>(`/runs/${enc(id)}/rerun`, {}),
  validate: (pipeline: unknown) => post<{ ok: boolean }>('/validate', { pipeline }),
  layer: (l: string) => get<{ layer: string; stats: Record<string, number> }>(`/layers/${enc(l)}`),
  tree: (l: string, path: string) =>
    get<Listing>(`/layers/${enc(l)}/tree${path ? '/' + path.split('/').map(enc).join('/') : ''}`),
  diff: (a: string, b: string) => get<LayerDiff>(`/layers/${enc(a)}/diff/${enc(b)}`),
  fileUrl: (l: string, path: string) => `/api/v1/layers/${enc(l)}/file/${path.split('/').map(enc).join('/')}`,
  archiveUrl: (l: string) => `/api/v1/layers/${enc(l)}/archive`,
  logUrl: (run: string, label: string) => `/api/v1/runs/${enc(run)}/tasks/${enc(label)}/log`,
};

/** Saves what `url` answers as a file (fetched with the token, so it works under `--auth all`). */
export async function download(url: string, name: string): Promise<void> {
  const res = await fetch(url, { headers: headers() });
  if (!res.ok) await fail(res);
  const blob = await res.blob();
  const href = URL.createObjectURL(blob);
  const a = document.createElement('a');
  a.href = href;
  a.download = name;
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10_000);
}

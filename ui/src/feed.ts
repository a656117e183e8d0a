// The global event feed (`/api/v1/events`): one connection for the whole
// page. Views subscribe; after a reconnect (`hello` again) or a `lagged`,
// they are told to refetch what they show, since the feed is live only.

import { Sse } from './sse';
import { observeServerTime } from './util';

export interface FeedEvent {
  kind: string; // run_queued, run_started, task_started, task_finished, note, run_finished
  run: string;
  seq: number;
  data: Record<string, any>;
}

type Listener = { event: (e: FeedEvent) => void; resync: () => void };

const listeners = new Set<Listener>();
let sse: Sse | null = null;
let up = false;
const statusListeners = new Set<(up: boolean, why?: string) => void>();

function setUp(v: boolean, why?: string) {
  up = v;
  statusListeners.forEach((f) => f(v, why));
}

function ensure(): void {
  if (sse) return;
  sse = new Sse('/api/v1/events', {
    onMessage: (m) => {
      if (m.event === 'hello') {
        setUp(true);
        listeners.forEach((l) => l.resync());
        return;
      }
      if (m.event === 'lagged') {
        listeners.forEach((l) => l.resync());
        return;
      }
      let parsed: any;
      try { parsed = JSON.parse(m.data); } catch { return; }
      observeServerTime(parsed.data?.at_ms);
      const ev: FeedEvent = { kind: m.event, run: String(parsed.run), seq: Number(parsed.seq), data: parsed.data ?? {} };
      listeners.forEach((l) => l.event(ev));
    },
    onDown: (why) => setUp(false, why),
  });
}

/** Subscribes; returns the unsubscribe. */
export function onFeed(event: (e: FeedEvent) => void, resync: () => void): () => void {
  ensure();
  const l = { event, resync };
  listeners.add(l);
  return () => listeners.delete(l);
}

export function onFeedStatus(f: (up: boolean, why?: string) => void): () => void {
  ensure();
  statusListeners.add(f);
  f(up);
  return () => statusListeners.delete(f);
}

// Server-Sent Events over fetch (not EventSource, which cannot send the
// bearer token a `--auth all` server wants). Reconnects by itself with a
// growing delay, resuming from the last `id:` it saw.

import { headers } from './api';

export interface SseMessage { event: string; data: string; id: string | null }

export interface SseOptions {
  onMessage: (m: SseMessage) => void;
  /** Connected (again): `true` the first time. */
  onOpen?: (first: boolean) => void;
  /** Lost: the stream ended or failed; a reconnect follows. */
  onDown?: (why: string) => void;
  /** Stop after an `end` event instead of reconnecting. */
  endOn?: string;
  resume?: boolean;
}

export class Sse {
  private ctl = new AbortController();
  private lastId: string | null = null;
  private delay = 500;
  private stopped = false;
  private opened = 0;

  constructor(private url: string, private opts: SseOptions) {
    void this.loop();
  }

  close(): void {
    this.stopped = true;
    this.ctl.abort();
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      let why = 'the stream ended';
      try {
        const h = headers({ Accept: 'text/event-stream' });
        if (this.opts.resume && this.lastId !== null) h['Last-Event-ID'] = this.lastId;
        const res = await fetch(this.url, { headers: h, signal: this.ctl.signal, cache: 'no-store' });
        if (!res.ok || !res.body) throw new Error(`HTTP ${res.status}`);
        this.delay = 500;
        this.opts.onOpen?.(this.opened++ === 0);
        if (await this.read(res.body)) return;
      } catch (e) {
        if (this.stopped) return;
        why = e instanceof Error ? e.message : String(e);
      }
      if (this.stopped) return;
      this.opts.onDown?.(why);
      await new Promise((r) => setTimeout(r, this.delay));
      // Capped low: a wall screen should be back within seconds of its server.
      this.delay = Math.min(this.delay * 2, 4_000);
    }
  }

  /** Reads one connection; `true` when the stream said it is over. */
  private async read(body: ReadableStream<Uint8Array>): Promise<boolean> {
    const reader = body.getReader();
    const dec = new TextDecoder();
    let buf = '';
    let event = 'message', data: string[] = [], id: string | null = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buf += dec.decode(value, { stream: true });
      let nl: number;
      while ((nl = buf.search(/\r\n|\n|\r/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf[nl] === '\r' && buf[nl + 1] === '\n' ? 2 : 1));
        if (line === '') {
          if (data.length) {
            if (id !== null) this.lastId = id;
            const m = { event, data: data.join('\n'), id };
            if (this.opts.endOn && event === this.opts.endOn) {
              this.opts.onMessage(m);
              this.stopped = true;
              this.ctl.abort();
              return true;
            }
            this.opts.onMessage(m);
          }
          event = 'message'; data = []; id = null;
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') event = val;
        else if (field === 'data') data.push(val);
        else if (field === 'id') id = val;
      }
    }
  }
}

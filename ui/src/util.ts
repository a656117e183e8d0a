import type { State } from './api';

export function dur(ms: number | null | undefined): string {
  if (ms === null || ms === undefined || !Number.isFinite(ms)) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} m ${Math.round(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} m`;
}

export function ago(ms: number): string {
  const d = Date.now() - ms;
  if (d < 60_000) return 'just now';
  if (d < 3_600_000) return `${Math.floor(d / 60_000)} min ago`;
  if (d < 86_400_000) return `${Math.floor(d / 3_600_000)} h ago`;
  return new Date(ms).toLocaleString();
}

export function when(ms: number): string {
  return ms ? new Date(ms).toLocaleString() : '–';
}

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined) return '';
  if (n < 1024) return `${n} B`;
  const u = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n / 1024, i = 0;
  while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${u[i]}`;
}

export function isFinal(s: State | string): boolean {
  return !['pending', 'running', 'queued'].includes(s);
}

/** A 1-second heartbeat for elapsed times (local only: it never asks the server). */
const tickers = new Set<() => void>();
setInterval(() => tickers.forEach((f) => f()), 1000);
export function everySecond(f: () => void): () => void {
  tickers.add(f);
  return () => tickers.delete(f);
}

/** Targets for display: the first few, then how many more. */
export function targetsText(t: string[], n = 3): string {
  if (!t.length) return '//...';
  return t.length > n ? `${t.slice(0, n).join(' ')} +${t.length - n} more` : t.join(' ');
}

/**
 * The server's clock, as its events tell it: every stored event carries
 * `at_ms`, so an elapsed time is the server's now minus the server's start,
 * whatever the page's own clock says. The offset is the largest
 * `at_ms - Date.now()` seen (an event is never received before it happened,
 * so the largest is the closest to the truth; replayed old events do not
 * lower it).
 */
let skew: number | null = null;
export function observeServerTime(atMs: unknown): void {
  if (typeof atMs !== 'number' || !Number.isFinite(atMs)) return;
  const d = atMs - Date.now();
  if (skew === null || d > skew) skew = d;
}
export function serverNow(): number {
  return Date.now() + (skew ?? 0);
}

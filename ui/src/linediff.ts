// A line diff of two small texts (LCS by dynamic programming over the
// lines between the common prefix and suffix), for the output diff view.

export type DiffLine = { kind: ' ' | '-' | '+'; text: string };

export function lineDiff(a: string, b: string, maxCells = 4_000_000): DiffLine[] | null {
  const A = a.split('\n'), B = b.split('\n');
  let pre = 0;
  while (pre < A.length && pre < B.length && A[pre] === B[pre]) pre++;
  let suf = 0;
  while (suf < A.length - pre && suf < B.length - pre && A[A.length - 1 - suf] === B[B.length - 1 - suf]) suf++;
  const a2 = A.slice(pre, A.length - suf), b2 = B.slice(pre, B.length - suf);
  const n = a2.length, m = b2.length;
  if (n * m > maxCells) return null;
  const L = new Uint32Array((n + 1) * (m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      L[i * (m + 1) + j] = a2[i] === b2[j] ? L[(i + 1) * (m + 1) + j + 1] + 1
        : Math.max(L[(i + 1) * (m + 1) + j], L[i * (m + 1) + j + 1]);
    }
  }
  const out: DiffLine[] = A.slice(0, pre).map((text) => ({ kind: ' ', text }));
  let i = 0, j = 0;
  while (i < n && j < m) {
    if (a2[i] === b2[j]) { out.push({ kind: ' ', text: a2[i] }); i++; j++; }
    else if (L[(i + 1) * (m + 1) + j] >= L[i * (m + 1) + j + 1]) out.push({ kind: '-', text: a2[i++] });
    else out.push({ kind: '+', text: b2[j++] });
  }
  while (i < n) out.push({ kind: '-', text: a2[i++] });
  while (j < m) out.push({ kind: '+', text: b2[j++] });
  for (const text of A.slice(A.length - suf)) out.push({ kind: ' ', text });
  return out;
}

/** Keeps changed lines with `context` lines around them; gaps become `null`. */
export function hunks(lines: DiffLine[], context = 3): (DiffLine | null)[] {
  const keep = new Uint8Array(lines.length);
  lines.forEach((l, i) => {
    if (l.kind !== ' ') for (let k = Math.max(0, i - context); k <= Math.min(lines.length - 1, i + context); k++) keep[k] = 1;
  });
  const out: (DiffLine | null)[] = [];
  let gap = false;
  lines.forEach((l, i) => {
    if (keep[i]) { out.push(l); gap = false; } else if (!gap) { out.push(null); gap = true; }
  });
  return out;
}

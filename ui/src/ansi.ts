// ANSI escape sequences in task logs, turned into styled text runs. SGR
// (colours, bold, …) becomes a style; every other sequence (cursor moves,
// OSC titles and hyperlinks, DCS, …) is dropped; other control characters
// are shown as visible symbols. The output is plain data for text nodes:
// a log can never make markup, a link or a script.

export interface Style {
  fg: number | string | null; // 0-255 palette index, or `rgb(r,g,b)`
  bg: number | string | null;
  bold: boolean;
  dim: boolean;
  italic: boolean;
  underline: boolean;
  inverse: boolean;
  strike: boolean;
}

export interface Run { text: string; style: Style | null }

export const PLAIN: Style = Object.freeze({
  fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, inverse: false, strike: false,
}) as Style;

function isPlain(s: Style): boolean {
  return s.fg === null && s.bg === null && !s.bold && !s.dim && !s.italic && !s.underline && !s.inverse && !s.strike;
}

function extended(params: number[], i: number): [number | string | null, number] {
  // 38;5;N or 38;2;R;G;B
  if (params[i + 1] === 5 && params[i + 2] !== undefined) {
    const n = params[i + 2];
    return [n >= 0 && n <= 255 ? n : null, i + 2];
  }
  if (params[i + 1] === 2 && params[i + 4] !== undefined) {
    const [r, g, b] = [params[i + 2], params[i + 3], params[i + 4]].map((v) => Math.max(0, Math.min(255, v | 0)));
    return [`rgb(${r},${g},${b})`, i + 4];
  }
  return [null, params.length];
}

/** Applies one SGR parameter list to `st` (a copy is returned). */
export function sgr(st: Style, text: string): Style {
  const out: Style = { ...st };
  const params = text === '' ? [0] : text.split(/[;:]/).map((p) => (p === '' ? 0 : parseInt(p, 10) || 0));
  for (let i = 0; i < params.length; i++) {
    const p = params[i];
    if (p === 0) Object.assign(out, PLAIN);
    else if (p === 1) out.bold = true;
    else if (p === 2) out.dim = true;
    else if (p === 3) out.italic = true;
    else if (p === 4) out.underline = true;
    else if (p === 7) out.inverse = true;
    else if (p === 9) out.strike = true;
    else if (p === 21 || p === 22) { out.bold = false; out.dim = false; }
    else if (p === 23) out.italic = false;
    else if (p === 24) out.underline = false;
    else if (p === 27) out.inverse = false;
    else if (p === 29) out.strike = false;
    else if (p >= 30 && p <= 37) out.fg = p - 30;
    else if (p === 38) { const [c, j] = extended(params, i); out.fg = c; i = j; }
    else if (p === 39) out.fg = null;
    else if (p >= 40 && p <= 47) out.bg = p - 40;
    else if (p === 48) { const [c, j] = extended(params, i); out.bg = c; i = j; }
    else if (p === 49) out.bg = null;
    else if (p >= 90 && p <= 97) out.fg = p - 90 + 8;
    else if (p >= 100 && p <= 107) out.bg = p - 100 + 8;
  }
  return out;
}

const CONTROL = /[\x00-\x08\x0b-\x1f\x7f]/g;
function visible(text: string): string {
  // U+2400.. are the "symbol for" control pictures.
  return text.replace(CONTROL, (c) => String.fromCharCode(c === '\x7f' ? 0x2421 : 0x2400 + c.charCodeAt(0)));
}

/**
 * Parses one line that starts in style `start`. Returns its runs and the
 * style in force at its end (for the next line).
 */
export function parseLine(line: string, start: Style = PLAIN): { runs: Run[]; end: Style } {
  // A carriage return redraws the line (progress bars): keep what was drawn last.
  const cr = line.lastIndexOf('\r', line.length - 2);
  if (cr >= 0) line = line.slice(cr + 1);
  if (line.endsWith('\r')) line = line.slice(0, -1);
  const runs: Run[] = [];
  let st = start;
  let text = '';
  const flush = () => {
    if (text) runs.push({ text: visible(text), style: isPlain(st) ? null : st });
    text = '';
  };
  let i = 0;
  while (i < line.length) {
    const c = line.charCodeAt(i);
    if (c !== 0x1b && c !== 0x9b) {
      const next = line.indexOf('\x1b', i);
      const end = next < 0 ? line.length : next;
      text += line.slice(i, end);
      i = end;
      continue;
    }
    // ESC sequences.
    const kind = c === 0x9b ? '[' : line[i + 1];
    const body = c === 0x9b ? i + 1 : i + 2;
    if (kind === '[') {
      // CSI: parameters 0x30-0x3f, intermediates 0x20-0x2f, final 0x40-0x7e.
      let j = body;
      while (j < line.length && line.charCodeAt(j) >= 0x20 && line.charCodeAt(j) <= 0x3f) j++;
      while (j < line.length && line.charCodeAt(j) >= 0x20 && line.charCodeAt(j) <= 0x2f) j++;
      if (j >= line.length) { i = line.length; break; }
      const final = line[j];
      if (final === 'm') {
        const params = line.slice(body, j);
        if (/^[0-9;:]*$/.test(params)) {
          flush();
          st = sgr(st, params);
        }
      }
      i = j + 1;
    } else if (kind === ']' || kind === 'P' || kind === '_' || kind === '^' || kind === 'X') {
      // OSC / DCS / APC / PM / SOS: up to BEL or ST (ESC \); all dropped.
      let j = body;
      for (; j < line.length; j++) {
        if (line[j] === '\x07') { j += 1; break; }
        if (line[j] === '\x1b' && line[j + 1] === '\\') { j += 2; break; }
      }
      i = j;
    } else if (kind === undefined) {
      i = line.length;
    } else {
      // Two-character escapes (ESC 7, ESC =, ESC ( B …).
      i = kind === '(' || kind === ')' || kind === '#' ? i + 3 : i + 2;
    }
  }
  flush();
  return { runs, end: st };
}

/** Whether a line may hold an escape sequence (most lines do not). */
export function hasEscape(line: string): boolean {
  return line.indexOf('\x1b') >= 0 || line.indexOf('\x9b') >= 0;
}

/** A run's style as CSS classes and inline CSSOM colours (never as markup). */
export function applyStyle(el: HTMLElement, st: Style): void {
  let fg = st.fg, bg = st.bg;
  if (st.inverse) [fg, bg] = [bg ?? 'var(--log-bg)', fg ?? 'var(--log-fg)'];
  const cls: string[] = [];
  if (typeof fg === 'number') {
    if (fg < 16) cls.push(`f${fg}`); else el.style.color = palette(fg);
  } else if (typeof fg === 'string') el.style.color = fg;
  if (typeof bg === 'number') {
    if (bg < 16) cls.push(`b${bg}`); else el.style.backgroundColor = palette(bg);
  } else if (typeof bg === 'string') el.style.backgroundColor = bg;
  if (st.bold) cls.push('ab');
  if (st.dim) cls.push('ad');
  if (st.italic) cls.push('ai');
  if (st.underline) cls.push('au');
  if (st.strike) cls.push('as');
  if (cls.length) el.className = cls.join(' ');
}

/** The xterm 256-colour palette, indices 16-255. */
export function palette(n: number): string {
  if (n >= 232) {
    const v = 8 + (n - 232) * 10;
    return `rgb(${v},${v},${v})`;
  }
  const i = n - 16;
  const level = (x: number) => (x === 0 ? 0 : 55 + x * 40);
  return `rgb(${level(Math.floor(i / 36))},${level(Math.floor(i / 6) % 6)},${level(i % 6)})`;
}

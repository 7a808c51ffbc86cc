/**
 * YAML (and JSON, which YAML 1.2 reads) with positions. Splits a text into documents, turns
 * each into plain JS values, and keeps the node tree so a field path can be mapped back to the
 * line and column a person must edit. Never throws: syntax problems come back as TG1002.
 */
import {
  LineCounter, parseAllDocuments, isAlias, isMap, isPair, isScalar, isSeq, isCollection,
  type Document, type Node, type Pair,
} from 'yaml';
import type { Diagnostic, SourceLocation } from './diagnostics.js';

export type PathSegment = string | number;

/** One parsed document (or one item of a JSON array / `kind: List`). */
export interface ParsedDocument {
  value: unknown;
  source: SourceLocation;
  locate(path: string): SourceLocation;
  /** Like locate, but points at the key when the path ends at a map key (for unknown fields). */
  locateKey(path: string): SourceLocation;
}

// Keys that are safe to print unquoted after a dot in a field path; anything else is ["quoted"].
const PLAIN_KEY = /^[A-Za-z_$][A-Za-z0-9_$-]*$/;

/** Renders path segments as `spec.servers[1].tls.mode`, quoting keys such as `["tls.crt"]`. */
export function formatPath(segments: readonly PathSegment[]): string {
  let out = '';
  for (const s of segments) {
    if (typeof s === 'number') out += `[${s}]`;
    else if (PLAIN_KEY.test(s)) out += out === '' ? s : `.${s}`;
    else out += `[${JSON.stringify(s)}]`;
  }
  return out;
}

/** Inverse of formatPath; tolerant of odd input (never throws). */
export function parsePath(path: string): PathSegment[] {
  const out: PathSegment[] = [];
  let i = 0;
  while (i < path.length) {
    const c = path[i];
    if (c === '.') { i++; continue; }
    if (c === '[') {
      const close = path[i + 1] === '"' ? findQuoteEnd(path, i + 2) : path.indexOf(']', i);
      if (path[i + 1] === '"' && close > 0) {
        try { out.push(JSON.parse(path.slice(i + 1, close + 1)) as string); } catch { out.push(path.slice(i + 2, close)); }
        i = path.indexOf(']', close) + 1 || path.length;
        continue;
      }
      const end = close < 0 ? path.length : close;
      const text = path.slice(i + 1, end);
      out.push(/^\d+$/.test(text) ? Number(text) : text);
      i = end + 1;
      continue;
    }
    let j = i;
    while (j < path.length && path[j] !== '.' && path[j] !== '[') j++;
    out.push(path.slice(i, j));
    i = j;
  }
  return out;
}

function findQuoteEnd(s: string, from: number): number {
  for (let i = from; i < s.length; i++) {
    if (s[i] === '\\') { i++; continue; }
    if (s[i] === '"') return i;
  }
  return -1;
}

/** `credentialName` -> `credential_name`: old docs use the proto's snake_case names. */
export function snakeCase(s: string): string {
  return s.replace(/[A-Z]/g, (c) => '_' + c.toLowerCase());
}

/** `credential_name` -> `credentialName`. */
export function camelCase(s: string): string {
  return s.replace(/_([a-z0-9])/g, (_m, c: string) => c.toUpperCase());
}

class Locator {
  constructor(
    private readonly doc: Document,
    private readonly root: Node | null,
    private readonly lc: LineCounter,
    private readonly file: string,
    readonly source: SourceLocation,
  ) {}

  private pos(offset: number): SourceLocation {
    const p = this.lc.linePos(offset);
    return { file: this.file, line: p.line, column: p.col };
  }

  private deref(n: unknown): unknown {
    return isAlias(n) ? n.resolve(this.doc) : n;
  }

  /**
   * The value's position for scalars and flow collections; the key's position for block
   * collections and empty values, since that is the line that names the field.
   */
  locate(path: string, preferKey = false): SourceLocation {
    try {
      const segs = parsePath(path);
      let node: unknown = this.root;
      let best: SourceLocation = this.source;
      for (const seg of segs) {
        node = this.deref(node);
        let next: unknown;
        let keyNode: unknown;
        if (isMap(node)) {
          const pair = findPair(node.items as Pair[], seg);
          if (!pair) break;
          next = pair.value;
          keyNode = pair.key;
        } else if (isSeq(node) && typeof seg === 'number') {
          next = node.items[seg];
          if (next === undefined) break;
        } else break;
        const v = this.deref(next) as Node | null | undefined;
        const blockish = preferKey || !v || (isScalar(v) && v.value === null) || (isCollection(v) && !v.flow);
        const anchor = (blockish && keyNode && (keyNode as Node).range) ? (keyNode as Node) : v;
        if (anchor && anchor.range) best = this.pos(anchor.range[0]);
        node = v;
      }
      return best;
    } catch {
      return this.source;
    }
  }
}

function findPair(items: Pair[], seg: PathSegment): Pair | undefined {
  const want = String(seg);
  let alias: Pair | undefined;
  const snake = typeof seg === 'string' ? snakeCase(seg) : undefined;
  for (const p of items) {
    if (!isPair(p)) continue;
    const k = isScalar(p.key) ? String(p.key.value) : String(p.key);
    if (k === want) return p;
    // A field renamed from its snake_case alias still points at the line that has it.
    if (snake !== undefined && snake !== want && k === snake) alias = p;
  }
  return alias;
}

/** Turns the parser's message into one readable line (position is reported separately). */
function readableMessage(msg: string): string {
  const first = msg.split('\n')[0] ?? msg;
  return first.replace(/ at line \d+, column \d+:?$/, '').trim();
}

export interface ParsedText {
  documents: ParsedDocument[];
  diagnostics: Diagnostic[];
}

/**
 * Parses every document of a YAML or JSON text. A document with a syntax error is reported
 * (TG1002) and left out; the others still load. Empty documents are dropped silently.
 */
export function parseDocuments(text: string, file: string): ParsedText {
  const documents: ParsedDocument[] = [];
  const diagnostics: Diagnostic[] = [];
  const lc = new LineCounter();
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
  let docs: Document[];
  try {
    const parsed = parseAllDocuments(text, { lineCounter: lc, prettyErrors: true });
    docs = Array.isArray(parsed) ? (parsed as Document[]) : [];
  } catch (e) {
    diagnostics.push(syntaxError(file, 1, 1, e));
    return { documents, diagnostics };
  }
  for (const doc of docs) {
    const start = doc.range?.[0] ?? 0;
    const startPos = lc.linePos(start);
    if (doc.errors.length > 0) {
      const err = doc.errors[0]!;
      const lp = err.linePos?.[0] ?? lc.linePos(err.pos[0]);
      diagnostics.push({
        code: 'TG1002', severity: 'error',
        location: { file, line: lp.line, column: lp.col },
        message: `YAML syntax error: ${readableMessage(err.message)}`,
        hint: 'this document is skipped; the other documents in the file still load',
      });
      continue;
    }
    const contents = doc.contents as Node | null;
    if (contents === null || (isScalar(contents) && contents.value === null)) continue;
    let value: unknown;
    try {
      value = doc.toJS({ maxAliasCount: 100 });
    } catch (e) {
      const p = contents.range ? lc.linePos(contents.range[0]) : startPos;
      diagnostics.push(syntaxError(file, p.line, p.col, e));
      continue;
    }
    const cstart = contents.range ? lc.linePos(contents.range[0]) : startPos;
    const source: SourceLocation = { file, line: cstart.line, column: cstart.col };
    // A JSON array or `kind: List` holds several resources: each item becomes its own document.
    const items = listItems(value);
    if (items) {
      const prefix = Array.isArray(value) ? '' : 'items';
      const whole = new Locator(doc, contents, lc, file, source);
      items.forEach((item, i) => {
        if (item === null || item === undefined) return;
        const base = `${prefix}[${i}]`;
        const itemSource = whole.locate(base);
        documents.push({
          value: item,
          source: itemSource,
          locate: (path: string) => whole.locate(path ? `${base}.${path}` : base),
          locateKey: (path: string) => whole.locate(path ? `${base}.${path}` : base, true),
        });
      });
      continue;
    }
    const loc = new Locator(doc, contents, lc, file, source);
    documents.push({ value, source, locate: (path: string) => loc.locate(path), locateKey: (path: string) => loc.locate(path, true) });
  }
  return { documents, diagnostics };
}

function listItems(value: unknown): unknown[] | undefined {
  if (Array.isArray(value)) return value;
  if (value && typeof value === 'object') {
    const v = value as Record<string, unknown>;
    if (typeof v.kind === 'string' && v.kind.endsWith('List') && Array.isArray(v.items)) return v.items;
  }
  return undefined;
}

function syntaxError(file: string, line: number, column: number, e: unknown): Diagnostic {
  const msg = e instanceof Error ? e.message : String(e);
  return {
    code: 'TG1002', severity: 'error', location: { file, line, column },
    message: `cannot read document: ${readableMessage(msg)}`,
  };
}

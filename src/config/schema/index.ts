/**
 * Schema validation for every kind the loader keeps. Runs ajv on the whole document, then turns
 * each ajv error into a Diagnostic that names the field path, the line, the bad value and what
 * would be valid. Unknown fields are warnings and are removed from the value, so nothing
 * downstream silently reads a field we never checked; snake_case names that Istio's old docs use
 * are renamed to their camelCase field.
 */
import { Ajv, type ErrorObject, type ValidateFunction } from 'ajv';
import type { Diagnostic, ResourceRef, SourceLocation } from '../diagnostics.js';
import { camelCase, formatPath, type PathSegment } from '../yaml.js';
import { duration, type Schema } from './common.js';
import { gatewaySchema } from './gateway.js';
import { virtualServiceSchema } from './virtualservice.js';
import { destinationRuleSchema } from './destinationrule.js';
import { serviceEntrySchema } from './serviceentry.js';
import { workloadEntrySchema } from './workloadentry.js';
import { peerAuthenticationSchema } from './peerauthentication.js';
import { configMapSchema, gatewayApiSchema, secretSchema } from './core.js';
import { gatewayApiSchemaFor, kubeObjectSchema } from './gateway-api.js';

export type SchemaKind =
  | 'Gateway' | 'VirtualService' | 'DestinationRule' | 'ServiceEntry' | 'WorkloadEntry'
  | 'PeerAuthentication' | 'Secret' | 'ConfigMap' | 'GatewayApi' | 'Kube';

const SCHEMAS: Record<SchemaKind, Schema> = {
  Gateway: gatewaySchema,
  VirtualService: virtualServiceSchema,
  DestinationRule: destinationRuleSchema,
  ServiceEntry: serviceEntrySchema,
  WorkloadEntry: workloadEntrySchema,
  PeerAuthentication: peerAuthenticationSchema,
  Secret: secretSchema,
  ConfigMap: configMapSchema,
  GatewayApi: gatewayApiSchema,
  Kube: kubeObjectSchema,
};

export interface ValidateContext {
  locate(path: string): SourceLocation;
  /** Position of the key itself; used for unknown fields. Defaults to locate. */
  locateKey?(path: string): SourceLocation;
  resource: ResourceRef;
}

let ajv: Ajv | undefined;
const compiled = new Map<SchemaKind, ValidateFunction>();

function validatorFor(kind: SchemaKind): ValidateFunction {
  let v = compiled.get(kind);
  if (v) return v;
  if (!ajv) {
    ajv = new Ajv({ allErrors: true, verbose: true, strict: false, logger: false });
    ajv.addKeyword({
      keyword: 'tgExclusive',
      type: 'object',
      schemaType: 'array',
      errors: true,
      validate: function exclusive(groups: string[][], data: Record<string, unknown>): boolean {
        const errors: Partial<ErrorObject>[] = [];
        for (const group of groups) {
          const present = group.filter((f) => data[f] !== undefined && data[f] !== null);
          if (present.length > 1) {
            errors.push({ keyword: 'tgExclusive', message: 'mutually exclusive', params: { present, group } });
          }
        }
        (exclusive as unknown as { errors: Partial<ErrorObject>[] }).errors = errors;
        return errors.length === 0;
      },
    });
  }
  v = ajv.compile(SCHEMAS[kind]);
  compiled.set(kind, v);
  return v;
}

/** Gateway API kinds have one schema each (gateway-api.ts); unknown kinds get the envelope only. */
function gatewayApiValidator(doc: Record<string, unknown>): ValidateFunction {
  const gk = typeof doc.kind === 'string' ? doc.kind : '';
  const schema = gatewayApiSchemaFor(gk);
  if (!schema) return validatorFor('GatewayApi');
  const key = `GatewayApi:${gk}` as SchemaKind;
  let v = compiled.get(key);
  if (!v) {
    validatorFor('GatewayApi'); // creates the shared ajv instance
    v = ajv!.compile(schema);
    compiled.set(key, v);
  }
  return v;
}

/** Istio parses port protocols case-insensitively; upper-case them before the enum check. */
function normaliseProtocols(kind: SchemaKind, doc: Record<string, unknown>): void {
  const spec = doc.spec as Record<string, unknown> | undefined;
  if (!spec || typeof spec !== 'object') return;
  const upper = (p: unknown) => {
    if (p && typeof p === 'object' && typeof (p as Record<string, unknown>).protocol === 'string') {
      const o = p as Record<string, string>;
      o.protocol = o.protocol!.toUpperCase();
    }
  };
  if (kind === 'Gateway' && Array.isArray(spec.servers)) {
    for (const s of spec.servers) if (s && typeof s === 'object') upper((s as Record<string, unknown>).port);
  }
  if (kind === 'ServiceEntry' && Array.isArray(spec.ports)) for (const p of spec.ports) upper(p);
}

/** JSON pointer -> path segments, using the data to tell list indexes from map keys. */
function segmentsOf(doc: unknown, pointer: string): PathSegment[] {
  if (pointer === '') return [];
  const out: PathSegment[] = [];
  let node: unknown = doc;
  for (const raw of pointer.slice(1).split('/')) {
    const key = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (Array.isArray(node) && /^\d+$/.test(key)) {
      out.push(Number(key));
      node = node[Number(key)];
    } else {
      out.push(key);
      node = node && typeof node === 'object' ? (node as Record<string, unknown>)[key] : undefined;
    }
  }
  return out;
}

const REDACTED = Symbol('redacted');

function show(v: unknown): string {
  if (v === REDACTED) return '(value hidden)';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'a list';
  if (typeof v === 'object') return 'an object';
  const s = JSON.stringify(v) ?? String(v);
  return s.length > 60 ? s.slice(0, 57) + '...' : s;
}

function typeName(v: unknown): string {
  if (v === REDACTED) return 'a value of another type';
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'list';
  if (typeof v === 'object') return 'object';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v;
}

function article(t: string): string {
  const names: Record<string, string> = {
    object: 'an object (key: value pairs)', array: 'a list', string: 'a string', integer: 'an integer',
    number: 'a number', boolean: 'a boolean (true or false)', null: 'null',
  };
  return t.split(',').map((x) => names[x] ?? x).join(' or ');
}

/** Levenshtein distance, small inputs only (field names). */
function distance(a: string, b: string): number {
  const d: number[] = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = d[0]!;
    d[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const tmp = d[j]!;
      d[j] = Math.min(d[j]! + 1, d[j - 1]! + 1, prev + (a[i - 1]!.toLowerCase() === b[j - 1]!.toLowerCase() ? 0 : 1));
      prev = tmp;
    }
  }
  return d[b.length]!;
}

function suggest(field: string, known: string[]): string | undefined {
  let best: string | undefined;
  let bestD = Infinity;
  for (const k of known) {
    const dd = distance(field, k);
    if (dd < bestD) { bestD = dd; best = k; }
  }
  return best !== undefined && bestD <= Math.max(2, Math.floor(field.length / 4)) ? best : undefined;
}

/**
 * Validates one document in place. Returns its diagnostics; the value afterwards has no unknown
 * fields and uses camelCase names.
 */
export function validateDocument(kind: SchemaKind, doc: Record<string, unknown>, ctx: ValidateContext): Diagnostic[] {
  const out: Diagnostic[] = [];
  const diag = (d: Omit<Diagnostic, 'resource' | 'location'>, path: string) => {
    const onKey = d.code === 'TG2004' && ctx.locateKey;
    out.push({ ...d, location: onKey ? ctx.locateKey!(path) : ctx.locate(path), resource: ctx.resource, path });
  };
  normaliseProtocols(kind, doc);
  const validate = kind === 'GatewayApi' ? gatewayApiValidator(doc) : validatorFor(kind);
  // Unknown fields are removed and the document checked again, so a renamed alias is validated
  // like the field it stands for. Each pass removes at least one key, so this ends; the bound is
  // a guard, not a limit real documents reach.
  let errors: ErrorObject[] = [];
  for (let pass = 0; pass < 8; pass++) {
    validate(doc);
    errors = validate.errors ? [...validate.errors] : [];
    let changed = false;
    for (const e of errors) {
      if (e.keyword !== 'additionalProperties') continue;
      const field = (e.params as { additionalProperty: string }).additionalProperty;
      const obj = e.data as Record<string, unknown>;
      if (!obj || typeof obj !== 'object' || !(field in obj)) continue;
      const known = Object.keys(((e.parentSchema as Schema | undefined)?.properties ?? {}) as Record<string, unknown>);
      const segs = [...segmentsOf(doc, e.instancePath), field];
      const path = formatPath(segs);
      const camel = camelCase(field);
      if (camel !== field && known.includes(camel)) {
        if (obj[camel] === undefined) {
          obj[camel] = obj[field];
          diag({ code: 'TG2004', severity: 'warning', message: `"${field}" is the old snake_case name of ${camel}: read as ${camel}`, hint: `use ${camel}` }, path);
        } else {
          diag({ code: 'TG2004', severity: 'warning', message: `"${field}" duplicates ${camel}: ignored`, hint: `remove ${field}` }, path);
        }
      } else {
        const guess = suggest(field, known);
        diag({
          code: 'TG2004', severity: 'warning', message: `unknown field "${field}": ignored`,
          hint: guess ? `did you mean ${guess}?` : (known.length > 0 && known.length <= 12 ? `known fields: ${known.join(', ')}` : undefined),
        }, path);
      }
      delete obj[field];
      changed = true;
    }
    if (!changed) break;
  }
  for (const e of errors) {
    if (e.keyword === 'additionalProperties') continue;
    // Secret values must never reach a message, not even a wrongly typed one.
    if (kind === 'Secret' && /^\/(data|stringData)\//.test(e.instancePath)) e.data = REDACTED;
    const d = mapError(e, doc);
    if (d) diag(d.diag, d.path);
  }
  return dedupe(out);
}

function dedupe(ds: Diagnostic[]): Diagnostic[] {
  const seen = new Set<string>();
  return ds.filter((d) => {
    const k = `${d.code}|${d.path}|${d.message}`;
    if (seen.has(k)) return false;
    seen.add(k);
    return true;
  });
}

type Partial2 = { diag: Omit<Diagnostic, 'resource' | 'location'>; path: string };

function mapError(e: ErrorObject, doc: unknown): Partial2 | undefined {
  const segs = segmentsOf(doc, e.instancePath);
  const path = formatPath(segs);
  const ps = (e.parentSchema ?? {}) as Schema;
  switch (e.keyword) {
    case 'required': {
      const missing = (e.params as { missingProperty: string }).missingProperty;
      return { path: formatPath([...segs, missing]), diag: { code: 'TG2001', severity: 'error', message: `required field "${missing}" is missing` } };
    }
    case 'type': {
      const want = String((e.params as { type: string | string[] }).type);
      return {
        path, diag: {
          code: 'TG2002', severity: 'error',
          message: `expected ${article(want)}, got ${typeName(e.data)}${e.data !== null && typeof e.data !== 'object' && e.data !== REDACTED ? ` ${show(e.data)}` : ''}`,
          hint: want === 'string' && (typeof e.data === 'number' || typeof e.data === 'boolean') ? `quote the value: "${String(e.data)}"` : undefined,
        },
      };
    }
    case 'enum': {
      const allowed = ((e.params as { allowedValues: unknown[] }).allowedValues ?? []).map(String);
      const value = e.data;
      const ci = typeof value === 'string' ? allowed.find((a) => a.toLowerCase() === value.toLowerCase()) : undefined;
      return {
        path, diag: {
          code: 'TG2003', severity: 'error',
          message: `${show(value)} is not a valid value`,
          hint: (ci ? `values are case-sensitive: use ${ci}; ` : '') + `valid values: ${allowed.join(', ')}`,
        },
      };
    }
    case 'minimum': case 'maximum': case 'exclusiveMinimum': case 'exclusiveMaximum': {
      const lo = ps.minimum as number | undefined, hi = ps.maximum as number | undefined;
      const range = lo !== undefined && hi !== undefined ? `between ${lo} and ${hi}` : lo !== undefined ? `at least ${lo}` : `at most ${hi}`;
      return { path, diag: { code: 'TG2005', severity: 'error', message: `${show(e.data)} is out of range: must be ${range}` } };
    }
    case 'pattern': {
      if (ps.pattern === duration.pattern) {
        return { path, diag: { code: 'TG2005', severity: 'error', message: `${show(e.data)} is not a duration`, hint: 'use a number with a unit, e.g. 10s, 250ms, 1m30s' } };
      }
      return { path, diag: { code: 'TG2005', severity: 'error', message: `${show(e.data)} does not match the pattern ${String(ps.pattern)}` } };
    }
    case 'minItems': {
      const n = (e.params as { limit: number }).limit;
      return { path, diag: { code: 'TG2005', severity: 'error', message: `must have at least ${n} item${n === 1 ? '' : 's'}` } };
    }
    case 'maxItems': {
      const n = (e.params as { limit: number }).limit;
      return { path, diag: { code: 'TG2005', severity: 'error', message: `must have at most ${n} item${n === 1 ? '' : 's'}` } };
    }
    case 'minLength':
      return { path, diag: { code: 'TG2005', severity: 'error', message: 'must not be empty' } };
    case 'tgExclusive': {
      const { present, group } = e.params as { present: string[]; group: string[] };
      const later = present[present.length - 1]!;
      return {
        path: formatPath([...segs, later]), diag: {
          code: 'TG2006', severity: 'error',
          message: `${present.join(' and ')} cannot be used together`,
          hint: `set only one of ${group.join(', ')}`,
        },
      };
    }
    default:
      return { path, diag: { code: 'TG2005', severity: 'error', message: e.message ?? `invalid value (${e.keyword})` } };
  }
}

/**
 * Building blocks for the per-kind JSON Schemas. Objects are closed (`additionalProperties:
 * false`) so a misspelt field is reported instead of silently ignored; the loader turns those
 * errors into TG2004 warnings and removes the field. `tgExclusive` is our own keyword: each
 * group lists fields of which at most one may be set (Istio's proto oneofs and its validation
 * rules), reported as TG2006.
 */
export type Schema = Record<string, unknown>;

export const str: Schema = { type: 'string' };
export const bool: Schema = { type: 'boolean' };
export const num: Schema = { type: 'number' };
export const int: Schema = { type: 'integer' };
export const uint: Schema = { type: 'integer', minimum: 0 };
export const strArray: Schema = { type: 'array', items: str };
export const strMap: Schema = { type: 'object', additionalProperties: str };
/** Fields Istio accepts that tlsgate only passes along (typed `unknown` in istio.ts). */
export const anyObject: Schema = { type: 'object' };

export const portNumber: Schema = { type: 'integer', minimum: 1, maximum: 65535 };

/** Go-style durations, as Istio's CRDs accept them: `10s`, `250ms`, `1m30s`, `0.5s`. */
export const duration: Schema = {
  type: 'string', pattern: '^([0-9]+(\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$',
};

export function enumOf(values: readonly string[]): Schema {
  return { type: 'string', enum: [...values] };
}

export function obj(properties: Record<string, Schema>, required: string[] = [], extra: Schema = {}): Schema {
  const s: Schema = { type: 'object', properties, additionalProperties: false, ...extra };
  if (required.length > 0) s.required = required;
  return s;
}

export function arrayOf(items: Schema, extra: Schema = {}): Schema {
  return { type: 'array', items, ...extra };
}

export function mapOf(values: Schema): Schema {
  return { type: 'object', additionalProperties: values };
}

/** Istio's StringMatch: a oneof of exact, prefix and regex. */
export const stringMatch: Schema = obj({ exact: str, prefix: str, regex: str }, [], { tgExclusive: [['exact', 'prefix', 'regex']] });

export const portSelector: Schema = obj({ number: portNumber });

export const destination: Schema = obj({ host: { type: 'string', minLength: 1 }, subset: str, port: portSelector }, ['host']);

export const percent: Schema = { type: 'number', minimum: 0, maximum: 100 };

/** metadata: only name is checked closely; the rest of ObjectMeta is accepted as Kubernetes has it. */
export const objectMeta: Schema = {
  type: 'object',
  properties: {
    name: { type: 'string', minLength: 1 },
    namespace: { type: 'string', minLength: 1 },
    labels: strMap,
    annotations: strMap,
    creationTimestamp: str,
  },
  required: ['name'],
};

/** The envelope every kind shares; `status` is what a cluster wrote back and is ignored. */
export function envelope(body: Record<string, Schema>, required: string[] = []): Schema {
  return obj({ apiVersion: str, kind: str, metadata: objectMeta, status: {}, ...body }, ['apiVersion', 'kind', 'metadata', ...required]);
}

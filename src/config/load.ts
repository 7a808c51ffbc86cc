/**
 * The config loader: files and directories -> typed resources with source locations, plus
 * diagnostics. Nothing here throws on bad input; every problem becomes a Diagnostic, and a
 * resource with an error is left out of the set so one bad resource does not block the rest.
 */
import { promises as fsp } from 'node:fs';
import * as nodePath from 'node:path';
import type { Diagnostic, ResourceRef, SourceLocation } from './diagnostics.js';
import {
  emptyResourceSet, type ConfigMapResource, type GatewayApiResource, type ObjectMeta, type Resource,
  type ResourceSet, type SecretResource, type KubeObjectResource,
} from './resource.js';
import { parseDocuments, formatPath, type ParsedDocument } from './yaml.js';
import { validateDocument, type SchemaKind } from './schema/index.js';

export interface LoadResult {
  resources: ResourceSet;
  diagnostics: Diagnostic[];
  /** The files read, in the order they were read. */
  files: string[];
}

/**
 * The namespace of a resource that does not name one. It is Kubernetes' "default" namespace, as
 * `kubectl apply` would use; the CLI's --namespace says where the proxy itself runs and does not
 * change this.
 */
export const DEFAULT_NAMESPACE = 'default';

const NETWORKING_KINDS = ['Gateway', 'VirtualService', 'DestinationRule', 'ServiceEntry', 'WorkloadEntry'] as const;
const NETWORKING_VERSIONS = ['v1', 'v1beta1', 'v1alpha3'];
const SECURITY_VERSIONS = ['v1', 'v1beta1'];
const GATEWAY_API_GROUP = 'gateway.networking.k8s.io';

/** apiVersion + kind -> which schema handles it; undefined when tlsgate does not read it. */
function classify(apiVersion: string, kind: string): { schema: SchemaKind } | { unknownVersion: string } | undefined {
  const slash = apiVersion.indexOf('/');
  const group = slash < 0 ? '' : apiVersion.slice(0, slash);
  const version = slash < 0 ? apiVersion : apiVersion.slice(slash + 1);
  if (group === GATEWAY_API_GROUP) return { schema: 'GatewayApi' };
  if ((NETWORKING_KINDS as readonly string[]).includes(kind)) {
    return group === 'networking.istio.io' && NETWORKING_VERSIONS.includes(version)
      ? { schema: kind as SchemaKind } : { unknownVersion: 'networking.istio.io/v1' };
  }
  if (kind === 'PeerAuthentication') {
    return group === 'security.istio.io' && SECURITY_VERSIONS.includes(version)
      ? { schema: 'PeerAuthentication' } : { unknownVersion: 'security.istio.io/v1' };
  }
  if (kind === 'Secret' || kind === 'ConfigMap') {
    return apiVersion === 'v1' ? { schema: kind } : { unknownVersion: 'v1' };
  }
  // Gateway API backends: a Service and the addresses behind it.
  if (kind === 'Service' || kind === 'Endpoints') {
    return apiVersion === 'v1' ? { schema: 'Kube' } : { unknownVersion: 'v1' };
  }
  if (kind === 'EndpointSlice') {
    return apiVersion === 'discovery.k8s.io/v1' ? { schema: 'Kube' } : { unknownVersion: 'discovery.k8s.io/v1' };
  }
  return undefined;
}

function groupOf(apiVersion: string): string {
  const slash = apiVersion.indexOf('/');
  return slash < 0 ? '' : apiVersion.slice(0, slash);
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function stringMap(v: unknown): Record<string, string> {
  const out: Record<string, string> = {};
  if (isRecord(v)) for (const [k, x] of Object.entries(v)) if (typeof x === 'string') out[k] = x;
  return out;
}

// Standard base64 with padding, as Kubernetes stores Secret data. Line breaks are tolerated
// because block scalars (`|`) often wrap long values.
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function fmtLoc(l: SourceLocation): string {
  return `${l.file}:${l.line}:${l.column}`;
}

/** Accumulates resources from any number of texts, spotting duplicates across all of them. */
class Collector {
  readonly resources = emptyResourceSet();
  readonly diagnostics: Diagnostic[] = [];
  private readonly seen = new Map<string, SourceLocation>();

  addText(text: string, file: string): void {
    let parsed;
    try {
      parsed = parseDocuments(text, file);
    } catch (e) {
      this.diagnostics.push({
        code: 'TG1002', severity: 'error', location: { file, line: 1, column: 1 },
        message: `cannot parse: ${e instanceof Error ? e.message : String(e)}`,
      });
      return;
    }
    this.diagnostics.push(...parsed.diagnostics);
    for (const doc of parsed.documents) {
      try {
        this.addDocument(doc);
      } catch (e) {
        // A loader bug must not take the other documents down with it.
        this.diagnostics.push({
          code: 'TG1003', severity: 'error', location: doc.source,
          message: `document could not be read: ${e instanceof Error ? e.message : String(e)}`,
        });
      }
    }
  }

  private addDocument(doc: ParsedDocument): void {
    const v = doc.value;
    if (!isRecord(v) || typeof v.apiVersion !== 'string' || typeof v.kind !== 'string' || v.apiVersion === '' || v.kind === '') {
      const missing = !isRecord(v) ? undefined : typeof v.apiVersion !== 'string' || v.apiVersion === '' ? 'apiVersion' : 'kind';
      this.diagnostics.push({
        code: 'TG1003', severity: 'error', location: doc.source,
        message: isRecord(v) ? `document has no ${missing}: it is not a Kubernetes resource` : `document is ${Array.isArray(v) ? 'a list' : `a ${typeof v}`}, not a resource`,
        hint: 'each document needs apiVersion, kind and metadata.name',
      });
      return;
    }
    const apiVersion = v.apiVersion, kind = v.kind;
    const meta = isRecord(v.metadata) ? v.metadata : {};
    const ref: ResourceRef = {
      kind,
      namespace: typeof meta.namespace === 'string' && meta.namespace !== '' ? meta.namespace : DEFAULT_NAMESPACE,
      name: typeof meta.name === 'string' && meta.name !== '' ? meta.name : '<unnamed>',
    };
    const cls = classify(apiVersion, kind);
    if (cls === undefined) {
      this.diagnostics.push({
        code: 'TG1004', severity: 'info', location: doc.source, resource: ref,
        message: `skipped: kind ${kind} is not used by tlsgate`,
      });
      return;
    }
    if ('unknownVersion' in cls) {
      this.diagnostics.push({
        code: 'TG1004', severity: 'warning', location: doc.locate('apiVersion'), resource: ref, path: 'apiVersion',
        message: `apiVersion ${apiVersion} is not known for ${kind}: skipped`,
        hint: `use apiVersion: ${cls.unknownVersion}`,
      });
      return;
    }
    const ds = validateDocument(cls.schema, v, { locate: doc.locate, locateKey: doc.locateKey, resource: ref });
    const extra = cls.schema === 'Secret' ? this.decodeSecret(v, doc, ref) : undefined;
    const all = extra ? [...ds, ...extra.diagnostics] : ds;
    this.diagnostics.push(...all);
    if (all.some((d) => d.severity === 'error')) return;

    const key = `${groupOf(apiVersion)}/${kind}/${ref.namespace}/${ref.name}`;
    const first = this.seen.get(key);
    if (first) {
      this.diagnostics.push({
        code: 'TG1005', severity: 'warning', location: doc.source, resource: ref,
        message: `duplicate ${kind} ${ref.namespace}/${ref.name}: this one is ignored`,
        hint: `the first definition is at ${fmtLoc(first)}`,
      });
      return;
    }
    this.seen.set(key, doc.source);

    const metadata: ObjectMeta = {
      name: ref.name, namespace: ref.namespace,
      labels: stringMap(meta.labels), annotations: stringMap(meta.annotations),
    };
    if (typeof meta.creationTimestamp === 'string') metadata.creationTimestamp = meta.creationTimestamp;
    const base = { apiVersion, kind, metadata, source: doc.source, locate: doc.locate };
    const spec = isRecord(v.spec) ? v.spec : {};
    const rs = this.resources;
    switch (cls.schema) {
      case 'Gateway': rs.gateways.push({ ...base, kind: 'Gateway', spec: spec as never }); break;
      case 'VirtualService': rs.virtualServices.push({ ...base, kind: 'VirtualService', spec: spec as never }); break;
      case 'DestinationRule': rs.destinationRules.push({ ...base, kind: 'DestinationRule', spec: spec as never }); break;
      case 'ServiceEntry': rs.serviceEntries.push({ ...base, kind: 'ServiceEntry', spec: spec as never }); break;
      case 'WorkloadEntry': rs.workloadEntries.push({ ...base, kind: 'WorkloadEntry', spec: spec as never }); break;
      case 'PeerAuthentication': rs.peerAuthentications.push({ ...base, kind: 'PeerAuthentication', spec: spec as never }); break;
      case 'Secret': {
        const secret: SecretResource = {
          ...base, kind: 'Secret', spec: {},
          type: typeof v.type === 'string' ? v.type : 'Opaque', data: extra!.data,
        };
        rs.secrets.push(secret);
        break;
      }
      case 'ConfigMap': {
        const cm: ConfigMapResource = { ...base, kind: 'ConfigMap', spec: {}, data: stringMap(v.data) };
        rs.configMaps.push(cm);
        break;
      }
      case 'GatewayApi': {
        const g: GatewayApiResource = { ...base, spec, group: GATEWAY_API_GROUP };
        rs.gatewayApi.push(g);
        break;
      }
      case 'Kube': {
        const k: KubeObjectResource = { ...base, spec, body: v };
        (rs.kube ??= []).push(k);
        break;
      }
    }
  }

  /** Decodes `data` (base64) and lays `stringData` over it, as the API server does. */
  private decodeSecret(v: Record<string, unknown>, doc: ParsedDocument, ref: ResourceRef):
    { data: Record<string, Buffer>; diagnostics: Diagnostic[] } {
    const data: Record<string, Buffer> = {};
    const diagnostics: Diagnostic[] = [];
    if (isRecord(v.data)) {
      for (const [k, raw] of Object.entries(v.data)) {
        if (typeof raw !== 'string') continue; // the schema has reported it
        const compact = raw.replace(/\s+/g, '');
        if (!BASE64.test(compact)) {
          const path = formatPath(['data', k]);
          // Never echo the value: it is secret material.
          diagnostics.push({
            code: 'TG2005', severity: 'error', location: doc.locate(path), resource: ref, path,
            message: `the value of key "${k}" is not valid base64`,
            hint: 'base64-encode the value (base64 -w0 <file>), or put it unencoded under stringData',
          });
          continue;
        }
        data[k] = Buffer.from(compact, 'base64');
      }
    }
    if (isRecord(v.stringData)) {
      for (const [k, s] of Object.entries(v.stringData)) if (typeof s === 'string') data[k] = Buffer.from(s, 'utf8');
    }
    return { data, diagnostics };
  }
}

/** Parses one YAML or JSON text (any number of documents). `file` is used in locations. */
export function parseText(text: string, file: string): { resources: ResourceSet; diagnostics: Diagnostic[] } {
  const c = new Collector();
  c.addText(text, file);
  return { resources: c.resources, diagnostics: c.diagnostics };
}

const CONFIG_EXT = /\.(ya?ml|json)$/i;

function errnoText(e: unknown): string {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  switch (code) {
    case 'ENOENT': return 'no such file or directory';
    case 'EACCES': case 'EPERM': return 'permission denied';
    case 'ELOOP': return 'too many levels of symbolic links';
    case 'ENOTDIR': return 'not a directory';
    default: return e instanceof Error ? e.message : String(e);
  }
}

/**
 * Lists config files under a path. Directories are walked recursively in byte order of names.
 * Entries whose name starts with "." are skipped: that covers the `..data` and `..<timestamp>`
 * directories of a mounted ConfigMap or Secret (the visible symlinks next to them are read
 * instead) and also `.git`. Symlinks are followed; a directory reached twice is read once.
 */
async function collectFiles(p: string, out: string[], diagnostics: Diagnostic[], visited: Set<string>): Promise<void> {
  let st;
  try {
    st = await fsp.stat(p);
  } catch (e) {
    diagnostics.push({ code: 'TG1001', severity: 'error', message: `cannot read ${p}: ${errnoText(e)}` });
    return;
  }
  if (st.isFile()) {
    out.push(p);
    return;
  }
  if (!st.isDirectory()) {
    diagnostics.push({ code: 'TG1001', severity: 'error', message: `cannot read ${p}: not a file or directory` });
    return;
  }
  await walk(p, out, diagnostics, visited, 0);
}

async function walk(dir: string, out: string[], diagnostics: Diagnostic[], visited: Set<string>, depth: number): Promise<void> {
  let real: string;
  try {
    real = await fsp.realpath(dir);
  } catch (e) {
    diagnostics.push({ code: 'TG1001', severity: 'error', message: `cannot read ${dir}: ${errnoText(e)}` });
    return;
  }
  if (visited.has(real) || depth > 64) return;
  visited.add(real);
  let names: string[];
  try {
    names = await fsp.readdir(dir);
  } catch (e) {
    diagnostics.push({ code: 'TG1001', severity: 'error', message: `cannot read ${dir}: ${errnoText(e)}` });
    return;
  }
  names.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  for (const name of names) {
    if (name.startsWith('.')) continue;
    const full = nodePath.join(dir, name);
    let st;
    try {
      st = await fsp.stat(full); // follows the symlinks of a mounted ConfigMap/Secret
    } catch {
      continue; // dangling symlink, or removed while we walked: nothing to read
    }
    if (st.isDirectory()) await walk(full, out, diagnostics, visited, depth + 1);
    else if (st.isFile() && CONFIG_EXT.test(name)) out.push(full);
  }
}

/**
 * Loads every config file under the given paths (files or directories). A file named
 * explicitly is read whatever its extension; in directories only *.yaml, *.yml and *.json are.
 */
export async function loadConfig(paths: string[]): Promise<LoadResult> {
  const c = new Collector();
  const candidates: string[] = [];
  const visited = new Set<string>();
  const pathDiagnostics: Diagnostic[] = [];
  for (const p of paths) await collectFiles(p, candidates, pathDiagnostics, visited);
  c.diagnostics.push(...pathDiagnostics);

  const files: string[] = [];
  const seenFiles = new Set<string>();
  for (const f of candidates) {
    let key = f;
    try { key = await fsp.realpath(f); } catch { /* read below reports it */ }
    if (seenFiles.has(key)) continue;
    seenFiles.add(key);
    let text: string;
    try {
      text = await fsp.readFile(f, 'utf8');
    } catch (e) {
      c.diagnostics.push({ code: 'TG1001', severity: 'error', message: `cannot read ${f}: ${errnoText(e)}` });
      continue;
    }
    files.push(f);
    c.addText(text, f);
  }
  if (files.length === 0 && paths.length > 0 && !pathDiagnostics.some((d) => d.code === 'TG1001')) {
    c.diagnostics.push({
      code: 'TG1006', severity: 'warning',
      message: `no configuration files (*.yaml, *.yml, *.json) found under ${paths.join(', ')}`,
    });
  }
  return { resources: c.resources, diagnostics: c.diagnostics, files };
}

export type { Resource };

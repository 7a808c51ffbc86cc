/**
 * The offline half of the pipeline shared by `run`, `validate` and `explain`: load the config
 * paths, translate them, and check that every certificate the snapshot names can be used. The
 * runtime repeats the certificate check when it applies the snapshot; doing it here too lets
 * `validate` catch a missing key file before anything is deployed.
 */
import { sortDiagnostics, type Diagnostic } from '../config/diagnostics.js';
import { translate, type TranslateOptions } from '../model/translate/index.js';
import type { Snapshot } from '../model/snapshot.js';
import { emptyResourceSet, type Resource, type ResourceSet } from '../config/resource.js';
import { CertStore } from '../runtime/pki/cert-store.js';

/** What one config source (a set of files, an etcd prefix) loaded. */
export interface LoadedPart {
  resources: ResourceSet;
  diagnostics: Diagnostic[];
  files?: string[];
}

export interface PipelineResult {
  snapshot: Snapshot;
  diagnostics: Diagnostic[];
  files: string[];
}

function identityOf(r: { apiVersion: string; kind: string; metadata: { namespace: string; name: string } }): string {
  const slash = r.apiVersion.indexOf('/');
  return `${slash < 0 ? '' : r.apiVersion.slice(0, slash)}/${r.kind}/${r.metadata.namespace}/${r.metadata.name}`;
}

/**
 * The union of resource sets from several sources (files, etcd prefixes), in order, with the
 * files they were read from. A resource defined by two sources is kept from the first and
 * reported (TG1005) at the second.
 */
export function mergeResourceSets(parts: LoadedPart[]): LoadedPart {
  if (parts.length === 1) return parts[0]!;
  const out = emptyResourceSet() as unknown as Record<string, unknown[]>;
  const diagnostics: Diagnostic[] = [];
  const files: string[] = [];
  const seen = new Map<string, string>();
  for (const part of parts) {
    diagnostics.push(...part.diagnostics);
    files.push(...(part.files ?? []));
    for (const [field, list] of Object.entries(part.resources) as [string, Resource[] | undefined][]) {
      for (const r of list ?? []) {
        const id = identityOf(r);
        const first = seen.get(id);
        const where = `${r.source.file}:${r.source.line}:${r.source.column}`;
        if (first !== undefined) {
          diagnostics.push({
            code: 'TG1005', severity: 'warning', location: r.source, resource: { kind: r.kind, namespace: r.metadata.namespace, name: r.metadata.name },
            message: `duplicate ${r.kind} ${r.metadata.namespace}/${r.metadata.name} in two config sources: this one is ignored`,
            hint: `the first definition is at ${first}`,
          });
          continue;
        }
        seen.set(id, where);
        (out[field] ??= []).push(r);
      }
    }
  }
  return { resources: out as unknown as ResourceSet, diagnostics, files };
}

/** Translates an already loaded resource set (from files, etcd, or both) and checks its certificates. */
export async function buildSnapshotFrom(
  loaded: LoadedPart,
  options: Partial<TranslateOptions>,
  checkSecrets = true,
): Promise<PipelineResult> {
  const { snapshot, diagnostics } = translate(loaded.resources, options);
  const all = [...loaded.diagnostics, ...diagnostics];
  if (checkSecrets) {
    const store = new CertStore();
    for (const spec of Object.values(snapshot.secrets)) {
      if (spec.source.kind !== 'file' && spec.source.kind !== 'inline') continue;
      const r = await store.load(spec);
      const origin = spec.origin;
      if ('error' in r && typeof r.error === 'string') {
        all.push({ code: 'TG3019', severity: 'error', message: r.error, ...(origin ? { resource: origin.resource, path: origin.path } : {}) });
      } else if ('warnings' in r) {
        for (const w of r.warnings) {
          all.push({ code: /readable/.test(w) ? 'TG5004' : 'TG5007', severity: 'warning', message: w, ...(origin ? { resource: origin.resource, path: origin.path } : {}) });
        }
      }
    }
  }
  return { snapshot, diagnostics: sortDiagnostics(all), files: loaded.files ?? [] };
}

/** Parses `k=v,k2=v2` into a label map. */
export function parseLabels(s: string | undefined): Record<string, string> | undefined {
  if (s === undefined) return undefined;
  const out: Record<string, string> = {};
  for (const part of s.split(',')) {
    if (!part.trim()) continue;
    const i = part.indexOf('=');
    if (i <= 0) throw new Error(`invalid label "${part}": expected key=value`);
    out[part.slice(0, i).trim()] = part.slice(i + 1).trim();
  }
  return out;
}

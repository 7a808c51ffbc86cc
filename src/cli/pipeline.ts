/**
 * The offline half of the pipeline shared by `run`, `validate` and `explain`: load the config
 * paths, translate them, and check that every certificate the snapshot names can be used. The
 * runtime repeats the certificate check when it applies the snapshot; doing it here too lets
 * `validate` catch a missing key file before anything is deployed.
 */
import { loadConfig } from '../config/load.js';
import { sortDiagnostics, type Diagnostic } from '../config/diagnostics.js';
import { translate, type TranslateOptions } from '../model/translate/index.js';
import type { Snapshot } from '../model/snapshot.js';
import { CertStore } from '../runtime/pki/cert-store.js';

export interface PipelineResult {
  snapshot: Snapshot;
  diagnostics: Diagnostic[];
  files: string[];
}

export async function buildSnapshot(paths: string[], options: Partial<TranslateOptions>, checkSecrets = true): Promise<PipelineResult> {
  const loaded = await loadConfig(paths);
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
  return { snapshot, diagnostics: sortDiagnostics(all), files: loaded.files };
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

/**
 * `tlsgate validate`: the same load + translate + certificate checks as `run`, offline.
 * Prints every diagnostic (file:line:column, kind/namespace/name, field path, message, hint)
 * and exits 0 when there is no error.
 */
import { formatDiagnostic, hasErrors } from '../config/diagnostics.js';
import { buildSnapshot, parseLabels } from './pipeline.js';

export interface ValidateOptions {
  config: string[];
  namespace: string;
  labels?: string;
  quiet?: boolean;
}

export async function validateCommand(opts: ValidateOptions, out: NodeJS.WritableStream = process.stdout): Promise<number> {
  const labels = parseLabels(opts.labels);
  const r = await buildSnapshot(opts.config, { proxyNamespace: opts.namespace, ...(labels ? { labels } : {}) });
  let errors = 0, warnings = 0;
  for (const d of r.diagnostics) {
    if (d.severity === 'error') errors++;
    else if (d.severity === 'warning') warnings++;
    else if (opts.quiet) continue;
    out.write(formatDiagnostic(d) + '\n');
  }
  const listeners = r.snapshot.listeners.length;
  out.write(`${r.files.length} file(s), ${errors} error(s), ${warnings} warning(s); ${listeners} listener(s), ${Object.keys(r.snapshot.clusters).length} cluster(s)\n`);
  return hasErrors(r.diagnostics) ? 1 : 0;
}

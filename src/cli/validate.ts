/**
 * `tlsgate validate`: the same load + translate + certificate checks as `run`, offline.
 * Prints every diagnostic (file:line:column, kind/namespace/name, field path, message, hint)
 * and exits 0 when there is no error. `--config etcd://host:2379/<prefix>` reads that prefix
 * once, as `run` would (one whole generation), so a stored configuration can be checked too.
 */
import { formatDiagnostic, hasErrors } from '../config/diagnostics.js';
import type { EtcdConnectionOptions } from '../sources/etcd.js';
import { readSourcesOnce } from '../sources/etcd-sources.js';
import { buildSnapshotFrom, mergeResourceSets, parseLabels } from './pipeline.js';

export interface ValidateOptions {
  config: string[];
  namespace: string;
  labels?: string;
  quiet?: boolean;
  /** TLS and auth for `--config etcd://...` entries. */
  etcd?: EtcdConnectionOptions;
}

export async function validateCommand(opts: ValidateOptions, out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const labels = parseLabels(opts.labels);
  let read;
  try {
    read = await readSourcesOnce(opts.config, opts.etcd ?? {});
  } catch (e) {
    err.write(`tlsgate validate: cannot read the configuration: ${(e as Error).message}\n`);
    return 1;
  }
  const r = await buildSnapshotFrom(mergeResourceSets(read.parts), { proxyNamespace: opts.namespace, ...(labels ? { labels } : {}) });
  let errors = 0, warnings = 0;
  for (const d of r.diagnostics) {
    if (d.severity === 'error') errors++;
    else if (d.severity === 'warning') warnings++;
    else if (opts.quiet) continue;
    out.write(formatDiagnostic(d) + '\n');
  }
  const listeners = r.snapshot.listeners.length;
  const stored = read.etcd.map((e) => `${e.url} (revision ${e.revision}, generation ${e.generation ?? 'none'}, ${e.keys} key(s))`);
  const from = stored.length ? `${r.files.length} file(s) and ${stored.join(', ')}` : `${r.files.length} file(s)`;
  out.write(`${from}, ${errors} error(s), ${warnings} warning(s); ${listeners} listener(s), ${Object.keys(r.snapshot.clusters).length} cluster(s)\n`);
  return hasErrors(r.diagnostics) ? 1 : 0;
}

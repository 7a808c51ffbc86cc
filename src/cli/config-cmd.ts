/**
 * `tlsgate config push | get | diff`: keep a local config directory and an etcd prefix in step.
 *
 * push  validates the local config exactly as `validate` does and refuses (exit 1, nothing
 *       written) on any error; otherwise one transaction writes every resource, deletes the keys
 *       that are gone, and bumps `<prefix>/.generation`, which is what replicas wait for.
 * get   prints the stored resources as one multi-document YAML stream.
 * diff  lists the keys a push would add, change or remove (exit 0 same, 1 different).
 *
 * Only keys and counts are printed by push and diff; values (Secrets included) never are.
 */
import type { Command } from 'commander';
import { formatDiagnostic, hasErrors } from '../config/diagnostics.js';
import { loadConfig } from '../config/load.js';
import { buildSnapshotFrom, parseLabels } from './pipeline.js';
import { createEtcdClient, isEtcdUrl, parseEtcdUrl, type EtcdConnectionOptions, type EtcdTarget } from '../sources/etcd.js';
import { diffEntries, entriesFromFiles, pushEntries, readStored, type EntryDiff } from '../sources/etcd-store.js';

/** The etcd connection flags shared by `run` and `config`. */
export function addEtcdOptions(cmd: Command): Command {
  return cmd
    .option('--etcd-ca <file>', 'etcd: CA bundle (PEM) that signs the etcd server certificate; turns TLS on')
    .option('--etcd-cert <file>', 'etcd: client certificate (PEM) for mTLS; turns TLS on')
    .option('--etcd-key <file>', 'etcd: client private key (PEM) for mTLS')
    .option('--etcd-user <name>', 'etcd: user for password auth')
    .option('--etcd-password <password>', 'etcd: password (prefer the TLSGATE_ETCD_PASSWORD environment variable: arguments show in ps)');
}

/** Reads the flags added by addEtcdOptions (the password may come from TLSGATE_ETCD_PASSWORD). */
export function etcdOptionsFrom(o: Record<string, unknown>): EtcdConnectionOptions {
  const str = (k: string) => (typeof o[k] === 'string' ? (o[k] as string) : undefined);
  const password = str('etcdPassword') ?? process.env['TLSGATE_ETCD_PASSWORD'];
  const user = str('etcdUser');
  return {
    ...(str('etcdCa') !== undefined ? { caFile: str('etcdCa') } : {}),
    ...(str('etcdCert') !== undefined ? { certFile: str('etcdCert') } : {}),
    ...(str('etcdKey') !== undefined ? { keyFile: str('etcdKey') } : {}),
    ...(user !== undefined ? { user } : {}),
    ...(user !== undefined && password !== undefined ? { password } : {}),
  };
}

function collect(v: string, prev: string[]): string[] {
  return [...prev, v];
}

function target(url: string, flag: string): EtcdTarget {
  if (!isEtcdUrl(url)) throw new Error(`${flag} expects etcd://host:2379[,host:2379]/<prefix>, got ${url}`);
  return parseEtcdUrl(url);
}

function printDiff(d: EntryDiff, out: NodeJS.WritableStream): void {
  for (const k of d.added) out.write(`+ ${k}\n`);
  for (const k of d.changed) out.write(`~ ${k}\n`);
  for (const k of d.removed) out.write(`- ${k}\n`);
}

function summary(d: EntryDiff): string {
  return `${d.added.length} added, ${d.changed.length} changed, ${d.removed.length} removed, ${d.unchanged} unchanged`;
}

/** Loads the local config; with validate, also translates it and checks its certificates. */
async function localEntries(paths: string[], prefix: string, validate: { namespace: string; labels?: string } | undefined, err: NodeJS.WritableStream) {
  const etcdPaths = paths.filter(isEtcdUrl);
  if (etcdPaths.length) throw new Error(`--config takes local files or directories here, not ${etcdPaths[0]}`);
  const loaded = await loadConfig(paths);
  let ok = true;
  if (validate) {
    const labels = parseLabels(validate.labels);
    const r = await buildSnapshotFrom(loaded, { proxyNamespace: validate.namespace, ...(labels ? { labels } : {}) });
    for (const d of r.diagnostics) if (d.severity === 'error' || d.severity === 'warning') err.write(formatDiagnostic(d) + '\n');
    ok = !hasErrors(r.diagnostics);
  }
  return { ok, entries: await entriesFromFiles(prefix, loaded.files, loaded.resources) };
}

export async function configPush(o: { config: string[]; to: string; namespace: string; labels?: string; dryRun?: boolean; allowEmpty?: boolean; etcd: EtcdConnectionOptions },
  out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const t = target(o.to, '--to');
  const local = await localEntries(o.config, t.prefix, { namespace: o.namespace, ...(o.labels !== undefined ? { labels: o.labels } : {}) }, err);
  if (!local.ok) {
    err.write(`tlsgate: the configuration has errors: nothing was written to ${t.url}\n`);
    return 1;
  }
  // An empty directory (or a wrong one) would delete every stored resource: ask for it explicitly.
  if (local.entries.size === 0 && !o.allowEmpty) {
    err.write(`tlsgate: no resources under ${o.config.join(', ')}: nothing was written (--allow-empty clears ${t.url})\n`);
    return 1;
  }
  const client = createEtcdClient(t, o.etcd);
  try {
    if (o.dryRun) {
      const stored = await readStored(client, t.prefix);
      const d = diffEntries(local.entries, stored.entries);
      printDiff(d, out);
      out.write(`dry run: would write generation ${(stored.generation ?? 0) + 1} to ${t.url}: ${summary(d)}\n`);
      return 0;
    }
    const r = await pushEntries(client, t.prefix, local.entries);
    printDiff(r.diff, out);
    if (!r.ok) {
      err.write(`tlsgate: ${r.message}\n`);
      return 1;
    }
    out.write(`pushed generation ${r.generation} to ${t.url} at revision ${r.revision}: ${summary(r.diff)}\n`);
    return 0;
  } catch (e) {
    const m = (e as Error).message;
    err.write(`tlsgate: push to ${t.url} failed: ${m}\n`);
    if (/too many operations/i.test(m)) err.write('hint: etcd limits one transaction to --max-txn-ops operations (default 128); raise it on the etcd servers\n');
    return 1;
  } finally {
    client.close();
  }
}

export async function configGet(o: { from: string; etcd: EtcdConnectionOptions }, out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const t = target(o.from, '--from');
  const client = createEtcdClient(t, o.etcd);
  try {
    const s = await readStored(client, t.prefix);
    out.write(`# ${t.url}: generation ${s.generation ?? 'none'}, revision ${s.revision}, ${s.entries.size} resource(s)\n`);
    for (const k of [...s.entries.keys()].sort()) {
      const v = s.entries.get(k)!;
      out.write(`---\n# ${k}\n${v}${v.endsWith('\n') ? '' : '\n'}`);
    }
    return 0;
  } catch (e) {
    err.write(`tlsgate: reading ${t.url} failed: ${(e as Error).message}\n`);
    return 2;
  } finally {
    client.close();
  }
}

export async function configDiff(o: { config: string[]; from: string; etcd: EtcdConnectionOptions }, out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const t = target(o.from, '--from');
  const local = await localEntries(o.config, t.prefix, undefined, err);
  const client = createEtcdClient(t, o.etcd);
  try {
    const s = await readStored(client, t.prefix);
    const d = diffEntries(local.entries, s.entries);
    printDiff(d, out);
    out.write(`${t.url} (generation ${s.generation ?? 'none'}) -> local: ${summary(d)}\n`);
    return d.added.length + d.changed.length + d.removed.length === 0 ? 0 : 1;
  } catch (e) {
    err.write(`tlsgate: reading ${t.url} failed: ${(e as Error).message}\n`);
    return 2;
  } finally {
    client.close();
  }
}

export function registerConfigCommands(program: Command): void {
  const config = program.command('config').description('share a configuration through etcd: push, get, diff');
  const wrap = (f: () => Promise<number>) => f().then((code) => { process.exitCode = code; }, (e: Error) => {
    process.stderr.write(`tlsgate: ${e.message}\n`);
    process.exitCode = 2;
  });
  addEtcdOptions(config.command('push')
    .description('validate a local configuration, then write it to an etcd prefix in one transaction (exit 1 and nothing written on errors)')
    .requiredOption('-c, --config <path>', 'file or directory (repeatable)', collect, [] as string[])
    .requiredOption('--to <url>', 'etcd://host:2379[,host:2379]/<prefix>')
    .option('--namespace <ns>', 'validate as a proxy in this namespace (credentialName lookups)', 'istio-system')
    .option('--labels <k=v,...>', 'validate as a proxy with these workload labels')
    .option('--dry-run', 'validate and show what would change; write nothing')
    .option('--allow-empty', 'push even when the local config has no resource (deletes every stored one)'))
    .action((o) => wrap(() => configPush({
      config: o.config, to: o.to, namespace: o.namespace, labels: o.labels, dryRun: o.dryRun === true, allowEmpty: o.allowEmpty === true, etcd: etcdOptionsFrom(o),
    })));
  addEtcdOptions(config.command('get')
    .description('print the resources stored under an etcd prefix as multi-document YAML')
    .requiredOption('--from <url>', 'etcd://host:2379[,host:2379]/<prefix>'))
    .action((o) => wrap(() => configGet({ from: o.from, etcd: etcdOptionsFrom(o) })));
  addEtcdOptions(config.command('diff')
    .description('list the keys a push of the local configuration would add (+), change (~) or remove (-); exit 1 when they differ')
    .requiredOption('-c, --config <path>', 'file or directory (repeatable)', collect, [] as string[])
    .requiredOption('--from <url>', 'etcd://host:2379[,host:2379]/<prefix>'))
    .action((o) => wrap(() => configDiff({ config: o.config, from: o.from, etcd: etcdOptionsFrom(o) })));
}

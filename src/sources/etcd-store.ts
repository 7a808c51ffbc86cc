/**
 * The writing side of the etcd store, used by `tlsgate config push|get|diff`: turn a local
 * config into key -> value entries, read what is stored, compare the two, and replace the stored
 * set in one transaction. Values are never printed or logged here; callers show keys only.
 */
import { promises as fsp } from 'node:fs';
import { parseAllDocuments, parse as parseYaml, stringify } from 'yaml';
import type { Etcd3 } from 'etcd3';
import type { ResourceSet } from '../config/resource.js';
import { DEFAULT_NAMESPACE } from '../config/load.js';
import { generationKey, groupSegment, isBookkeepingKey, rangePrefix, resourceKey } from './etcd.js';

export interface StoredSet {
  /** Resource keys -> values (bookkeeping keys left out). */
  entries: Map<string, string>;
  revision: number;
  generation: number | null;
  /** mod_revision of the generation key (0 when absent): what a push compares against. */
  generationModRevision: number;
}

export interface EntryDiff {
  added: string[];
  changed: string[];
  removed: string[];
  unchanged: number;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** One canonical YAML text per resource, so that a diff compares content, not formatting. */
export function canonicalValue(value: Record<string, unknown>): string {
  return stringify(value, { lineWidth: 0, aliasDuplicateObjects: false });
}

/** A stored value in canonical form; text that does not parse is compared as it is. */
export function canonicalStored(text: string): string {
  try {
    const v: unknown = parseYaml(text);
    return isRecord(v) ? canonicalValue(v) : text;
  } catch {
    return text;
  }
}

function identity(apiVersion: string, kind: string, namespace: string, name: string): string {
  return `${groupSegment(apiVersion)}/${kind}/${namespace}/${name}`;
}

/**
 * The entries a push writes: one per resource the loader kept, taken from the files in the
 * order the loader read them (the first of two duplicates wins, as in the loader). The stored
 * value names its namespace explicitly so it reads the same wherever it is loaded.
 */
export async function entriesFromFiles(prefix: string, files: readonly string[], kept: ResourceSet): Promise<Map<string, string>> {
  const keep = new Set<string>();
  for (const list of Object.values(kept) as { apiVersion: string; kind: string; metadata: { namespace: string; name: string } }[][]) {
    for (const r of list) keep.add(identity(r.apiVersion, r.kind, r.metadata.namespace, r.metadata.name));
  }
  const out = new Map<string, string>();
  for (const file of files) {
    const text = await fsp.readFile(file, 'utf8');
    for (const doc of parseAllDocuments(text)) {
      if (doc.errors.length) continue;
      const v: unknown = doc.toJS({ maxAliasCount: 100 });
      if (!isRecord(v) || typeof v.apiVersion !== 'string' || typeof v.kind !== 'string' || !isRecord(v.metadata)) continue;
      const meta = v.metadata;
      if (typeof meta.name !== 'string' || meta.name === '') continue;
      const namespace = typeof meta.namespace === 'string' && meta.namespace !== '' ? meta.namespace : DEFAULT_NAMESPACE;
      const id = identity(v.apiVersion, v.kind, namespace, meta.name);
      if (!keep.has(id)) continue;
      const key = resourceKey(prefix, { apiVersion: v.apiVersion, kind: v.kind, namespace, name: meta.name });
      if (out.has(key)) continue;
      out.set(key, canonicalValue({ ...v, metadata: { ...meta, namespace } }));
    }
  }
  return out;
}

/** Reads every key under the prefix in one consistent Range. */
export async function readStored(client: Etcd3, prefix: string): Promise<StoredSet> {
  const res = await client.getAll().prefix(rangePrefix(prefix)).exec();
  const entries = new Map<string, string>();
  let generation: number | null = null;
  let generationModRevision = 0;
  const genKey = generationKey(prefix);
  for (const kv of res.kvs) {
    const key = kv.key.toString('utf8');
    if (key === genKey) {
      const n = Number(kv.value.toString('utf8').trim());
      generation = Number.isSafeInteger(n) ? n : null;
      generationModRevision = Number(kv.mod_revision);
      continue;
    }
    if (isBookkeepingKey(prefix, key)) continue;
    entries.set(key, kv.value.toString('utf8'));
  }
  return { entries, revision: Number(res.header.revision), generation, generationModRevision };
}

/** What a push would change: keys only, sorted. */
export function diffEntries(local: ReadonlyMap<string, string>, stored: ReadonlyMap<string, string>): EntryDiff {
  const added: string[] = [], changed: string[] = [], removed: string[] = [];
  let unchanged = 0;
  for (const [k, v] of local) {
    const s = stored.get(k);
    if (s === undefined) added.push(k);
    else if (canonicalStored(s) !== v) changed.push(k);
    else unchanged++;
  }
  for (const k of stored.keys()) if (!local.has(k)) removed.push(k);
  return { added: added.sort(), changed: changed.sort(), removed: removed.sort(), unchanged };
}

export interface PushResult {
  ok: boolean;
  /** Why a push did not happen (the store moved underneath, etcd refused). */
  message?: string;
  diff: EntryDiff;
  generation: number;
  revision: number;
}

/**
 * Replaces the stored set with `local` in one transaction: puts for added and changed keys,
 * deletes for keys that are gone, and generation + 1. The transaction only commits if the
 * generation key has not moved since it was read, so two pushes at once cannot interleave.
 */
export async function pushEntries(client: Etcd3, prefix: string, local: ReadonlyMap<string, string>): Promise<PushResult> {
  const stored = await readStored(client, prefix);
  const diff = diffEntries(local, stored.entries);
  const generation = (stored.generation ?? 0) + 1;
  const ops = [
    ...[...diff.added, ...diff.changed].map((k) => client.put(k).value(local.get(k)!)),
    ...diff.removed.map((k) => client.delete().key(k)),
    client.put(generationKey(prefix)).value(String(generation)),
  ];
  const res = await client.if(generationKey(prefix), 'Mod', '==', stored.generationModRevision).then(...ops).commit();
  if (!res.succeeded) {
    return { ok: false, message: 'the stored set changed while this push was being prepared (another push?): nothing was written; run it again', diff, generation: stored.generation ?? 0, revision: Number(res.header.revision) };
  }
  return { ok: true, diff, generation, revision: Number(res.header.revision) };
}

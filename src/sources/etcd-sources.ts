/**
 * The config sources of one `run`: the `--config` entries split into file paths (read by the
 * loader and watched by FileSource) and `etcd://` targets (each an EtcdSource). `load()` returns
 * every source's resource set, files first, for the pipeline to merge, together with the etcd
 * generations it used, so the gateway can report what it serves once it applied them.
 */
import { loadConfig } from '../config/load.js';
import type { Diagnostic } from '../config/diagnostics.js';
import type { ResourceSet } from '../config/resource.js';
import { isEtcdUrl, parseEtcdUrl, parseStored, usesTls, type EtcdConnectionOptions } from './etcd.js';
import { EtcdSource, type EtcdGeneration } from './etcd-source.js';

/** The part of the telemetry the sources use (metrics and operational log). */
export interface SourceTelemetry {
  set(name: string, value: number, labels?: Record<string, string>): void;
  log(level: 'debug' | 'info' | 'warn' | 'error', msg: string, fields?: Record<string, unknown>): void;
}

export interface LoadedSources {
  parts: { resources: ResourceSet; diagnostics: Diagnostic[]; files?: string[] }[];
  /** The etcd generation each source contributed, in source order. */
  used: EtcdGeneration[];
}

export class ConfigSources {
  readonly filePaths: string[];
  readonly etcd: EtcdSource[];
  #telemetry: SourceTelemetry | undefined;

  /** Throws on a malformed etcd:// entry or unreadable TLS files. */
  constructor(config: readonly string[], conn: EtcdConnectionOptions, onChange: () => void) {
    this.filePaths = config.filter((c) => !isEtcdUrl(c));
    this.etcd = [];
    try {
      for (const c of config.filter(isEtcdUrl)) {
        const src: EtcdSource = new EtcdSource(parseEtcdUrl(c), conn, {
          onChange,
          onStatus: () => this.#exportMetrics(),
          log: (level, msg, fields) => this.#telemetry?.log(level, msg, fields),
        });
        this.etcd.push(src);
      }
    } catch (e) {
      this.close();
      throw e;
    }
  }

  /** A warning worth printing before anything starts (credentials over plaintext). */
  warnings(conn: EtcdConnectionOptions): string[] {
    if (this.etcd.length && conn.user !== undefined && !usesTls(conn)) {
      return ['etcd password auth without TLS: the password and the stored Secrets cross the network in clear; add --etcd-ca (and --etcd-cert/--etcd-key)'];
    }
    return [];
  }

  /**
   * Reads every etcd prefix once (each retried while etcd is unreachable, up to timeoutMs), then
   * watches them unless `watch` is false.
   */
  async start(timeoutMs = 10_000, watch = true): Promise<void> {
    await Promise.all(this.etcd.map((s) => s.start(timeoutMs, watch)));
  }

  async load(): Promise<LoadedSources> {
    const parts: LoadedSources['parts'] = [];
    if (this.filePaths.length || !this.etcd.length) parts.push(await loadConfig(this.filePaths));
    const used: EtcdGeneration[] = [];
    for (const s of this.etcd) {
      const g = s.current();
      used.push(g);
      parts.push(parseStored(s.target.prefix, g.entries));
    }
    return { parts, used };
  }

  /** After an apply succeeded: these generations are what serves. */
  markServed(used: readonly EtcdGeneration[]): void {
    this.etcd.forEach((s, i) => { if (used[i]) s.markServed(used[i]); });
    this.#exportMetrics();
  }

  setTelemetry(t: SourceTelemetry): void {
    this.#telemetry = t;
    this.#exportMetrics();
  }

  /** For /config_dump: files as paths, etcd sources with revision, generation and connection. */
  status(): Record<string, unknown>[] {
    return [
      ...this.filePaths.map((path) => ({ kind: 'file', path })),
      ...this.etcd.map((s) => ({ ...s.status() })),
    ];
  }

  close(): void {
    for (const s of this.etcd) s.close();
  }

  #exportMetrics(): void {
    const t = this.#telemetry;
    if (!t) return;
    for (const s of this.etcd) {
      const st = s.status();
      // The label is the --config entry: bounded by the command line, free of credentials.
      t.set('config_source_revision', st.revision, { source: st.url });
      t.set('config_source_generation', st.generation ?? 0, { source: st.url });
      t.set('config_source_connected', st.connected ? 1 : 0, { source: st.url });
    }
  }
}

/** What a command that does not serve read from its `--config` entries. */
export interface SourcesReadOnce extends LoadedSources {
  /** The `etcd://` entries, in order, each with the generation it contributed. */
  etcd: { url: string; revision: number; generation: number | null; keys: number }[];
}

/**
 * Reads every `--config` entry once, files and `etcd://` prefixes alike, with the key layout
 * `run` reads (one whole generation per prefix), for `validate` and `explain`. Nothing keeps
 * watching. Rejects on a malformed etcd URL or when etcd cannot be read within timeoutMs.
 */
export async function readSourcesOnce(config: readonly string[], conn: EtcdConnectionOptions = {}, timeoutMs = 10_000): Promise<SourcesReadOnce> {
  const sources = new ConfigSources(config, conn, () => {});
  try {
    await sources.start(timeoutMs, false);
    const loaded = await sources.load();
    const etcd = sources.etcd.map((s, i) => {
      const g = loaded.used[i]!;
      return { url: s.target.url, revision: g.revision, generation: g.generation, keys: g.entries.size };
    });
    return { ...loaded, etcd };
  } finally {
    sources.close();
  }
}

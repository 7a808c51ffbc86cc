/**
 * A config source that follows one etcd prefix and hands out whole generations only.
 *
 * Start: one Range over the prefix (a consistent read at revision R), then a watch from R+1.
 * Every watch event is applied to a live copy of the keys, but the copy that callers read is
 * replaced only at a revision that also moved `<prefix>/.generation`: a push writes all its keys
 * and the generation in one transaction, whose events arrive together at one revision, so what
 * callers see is always a whole push. Writes made without a generation bump wait for the next one.
 *
 * etcd unreachable: the last whole generation stays readable, status says disconnected, and the
 * watch reconnects with a bounded backoff from the last revision seen. If etcd has compacted that
 * revision it cancels the watch; the source then reads the whole prefix again.
 */
import type { Etcd3, IKeyValue, IWatchResponse, Watcher } from 'etcd3';
import { createEtcdClient, generationKey, rangePrefix, type EtcdConnectionOptions, type EtcdTarget } from './etcd.js';

/** A whole generation: what a snapshot is built from. */
export interface EtcdGeneration {
  /** Every key under the prefix (bookkeeping keys included) -> its value. */
  entries: ReadonlyMap<string, string>;
  /** The etcd revision this set was read at. */
  revision: number;
  /** The value of `<prefix>/.generation` at that revision; null when the prefix has none. */
  generation: number | null;
}

export interface EtcdSourceStatus {
  kind: 'etcd';
  url: string;
  endpoints: string[];
  prefix: string;
  /** Revision and generation of the set that is serving (set through markServed). */
  revision: number;
  generation: number | null;
  /** The newest whole generation received (ahead of the serving one while an edit is refused). */
  received: { revision: number; generation: number | null };
  connected: boolean;
  /** How many times the whole prefix was read (1 at start; more after a compaction). */
  fullLoads: number;
  lastError?: string;
  /** When the connection was last lost, ISO time; absent while connected. */
  disconnectedSince?: string;
}

export interface EtcdSourceHooks {
  /** A new whole generation arrived (read it with current()). */
  onChange(): void;
  /** Connected/disconnected changed. */
  onStatus?(): void;
  log?(level: 'info' | 'warn', msg: string, fields?: Record<string, unknown>): void;
}

function num(s: string | number | undefined): number {
  const n = Number(s ?? 0);
  return Number.isFinite(n) ? n : 0;
}

function parseGeneration(v: string | undefined): number | null {
  if (v === undefined) return null;
  const n = Number(v.trim());
  return Number.isSafeInteger(n) ? n : null;
}

export class EtcdSource {
  readonly target: EtcdTarget;
  readonly #client: Etcd3;
  readonly #hooks: EtcdSourceHooks;
  /** Every event applied, whole or not. */
  #live = new Map<string, string>();
  #lastRevision = 0;
  #whole: EtcdGeneration = { entries: new Map(), revision: 0, generation: null };
  #served: { revision: number; generation: number | null } = { revision: 0, generation: null };
  #connected = false;
  #fullLoads = 0;
  #lastError: string | undefined;
  #disconnectedSince: string | undefined;
  #watcher: Watcher | undefined;
  #closed = false;
  #reloadTimer: NodeJS.Timeout | undefined;
  #reloadAttempt = 0;

  constructor(target: EtcdTarget, conn: EtcdConnectionOptions, hooks: EtcdSourceHooks) {
    this.target = target;
    this.#hooks = hooks;
    this.#client = createEtcdClient(target, conn);
  }

  /**
   * Reads the whole prefix (retrying for up to timeoutMs while etcd cannot be reached), then
   * starts watching (unless `watch` is false: a one-time read). Rejects when etcd stays
   * unreachable or refuses (auth, TLS).
   */
  async start(timeoutMs = 10_000, watch = true): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (let attempt = 0; ; attempt++) {
      try {
        await this.#loadAll();
        break;
      } catch (e) {
        this.#lastError = errText(e);
        if (this.#closed || Date.now() + 250 > deadline || !retryable(e)) {
          throw new Error(`etcd ${this.target.endpoints.join(',')}: ${this.#lastError}`);
        }
        await sleep(Math.min(250 * 2 ** attempt, 2000, Math.max(0, deadline - Date.now())));
      }
    }
    if (watch) this.#watch();
  }

  /** The last whole generation. */
  current(): EtcdGeneration {
    return this.#whole;
  }

  /** Records which generation is serving (after the gateway applied it). */
  markServed(g: EtcdGeneration): void {
    this.#served = { revision: g.revision, generation: g.generation };
  }

  status(): EtcdSourceStatus {
    return {
      kind: 'etcd', url: this.target.url, endpoints: [...this.target.endpoints], prefix: this.target.prefix,
      revision: this.#served.revision, generation: this.#served.generation,
      received: { revision: this.#whole.revision, generation: this.#whole.generation },
      connected: this.#connected, fullLoads: this.#fullLoads,
      ...(this.#lastError !== undefined ? { lastError: this.#lastError } : {}),
      ...(this.#disconnectedSince !== undefined ? { disconnectedSince: this.#disconnectedSince } : {}),
    };
  }

  get connected(): boolean {
    return this.#connected;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#reloadTimer) clearTimeout(this.#reloadTimer);
    const w = this.#watcher;
    this.#watcher = undefined;
    void w?.cancel().catch(() => undefined);
    this.#client.close();
  }

  #setConnected(on: boolean, error?: unknown): void {
    if (error !== undefined) this.#lastError = errText(error);
    if (on === this.#connected) return;
    this.#connected = on;
    this.#disconnectedSince = on ? undefined : new Date().toISOString();
    this.#hooks.log?.(on ? 'info' : 'warn', on ? 'etcd connected' : 'etcd disconnected: serving the last good config', {
      source: this.target.url, revision: this.#lastRevision, ...(on ? {} : { error: this.#lastError }),
    });
    this.#hooks.onStatus?.();
  }

  /** One consistent read of the prefix; replaces both the live and the whole copy. */
  async #loadAll(): Promise<void> {
    const res = await this.#client.getAll().prefix(rangePrefix(this.target.prefix)).exec();
    const entries = new Map<string, string>();
    for (const kv of res.kvs) entries.set(kv.key.toString('utf8'), kv.value.toString('utf8'));
    this.#live = entries;
    this.#lastRevision = num(res.header.revision);
    this.#fullLoads++;
    this.#setConnected(true);
    this.#publish(this.#lastRevision);
  }

  #publish(revision: number): void {
    const before = this.#whole;
    const generation = parseGeneration(this.#live.get(generationKey(this.target.prefix)));
    this.#whole = { entries: new Map(this.#live), revision, generation };
    if (before.revision !== revision || before.generation !== generation) this.#hooks.onChange();
  }

  #watch(): void {
    if (this.#closed) return;
    const w = this.#client.watch().prefix(rangePrefix(this.target.prefix)).startRevision(String(this.#lastRevision + 1)).watcher();
    this.#watcher = w;
    // etcd3 moves the resume revision to the header revision of each response; ours is the last
    // event actually applied, so a reconnect never skips events that were not delivered yet.
    const resumeFrom = () => { (w.request as { start_revision?: string }).start_revision = String(this.#lastRevision + 1); };
    w.on('connected', () => {
      resumeFrom();
      this.#reloadAttempt = 0;
      this.#setConnected(true);
    });
    w.on('disconnected', (e) => {
      resumeFrom();
      this.#setConnected(false, e);
    });
    w.on('data', (res: IWatchResponse) => {
      try {
        this.#onEvents(res);
      } finally {
        resumeFrom();
      }
    });
    // A cancelled watch: etcd compacted the revision we asked for (or refused the watch).
    // Read everything again, then watch from there.
    w.on('error', (e) => {
      if (this.#watcher !== w) return;
      this.#watcher = undefined;
      this.#hooks.log?.('warn', 'etcd watch cancelled: reading the whole prefix again', { source: this.target.url, revision: this.#lastRevision, error: errText(e) });
      this.#lastError = errText(e);
      this.#scheduleReload(0);
    });
  }

  #scheduleReload(delayMs: number): void {
    if (this.#closed) return;
    this.#reloadTimer = setTimeout(() => {
      this.#reloadTimer = undefined;
      this.#loadAll().then(() => {
        this.#reloadAttempt = 0;
        this.#watch();
      }, (e: unknown) => {
        this.#setConnected(false, e);
        this.#scheduleReload(Math.min(250 * 2 ** this.#reloadAttempt++, 4000));
      });
    }, delayMs);
    this.#reloadTimer.unref();
  }

  #onEvents(res: IWatchResponse): void {
    if (res.events.length === 0) {
      // Progress notification: etcd sends these only to a watcher that has caught up.
      this.#lastRevision = Math.max(this.#lastRevision, num(res.header.revision));
      return;
    }
    const genKey = generationKey(this.target.prefix);
    // A response may carry several revisions; each one is applied on its own so that a
    // generation is published exactly as it was committed, not mixed with later writes.
    let i = 0;
    while (i < res.events.length) {
      const rev = num(res.events[i]!.kv.mod_revision);
      const replayed = rev <= this.#lastRevision; // already applied before a reconnect
      let touchesGeneration = false;
      for (; i < res.events.length && num(res.events[i]!.kv.mod_revision) === rev; i++) {
        if (replayed) continue;
        const ev = res.events[i]!;
        const kv: IKeyValue = ev.kv;
        const key = kv.key.toString('utf8');
        if (ev.type === 'Delete') this.#live.delete(key);
        else this.#live.set(key, kv.value.toString('utf8'));
        if (key === genKey) touchesGeneration = true;
      }
      if (replayed) continue;
      this.#lastRevision = rev;
      if (touchesGeneration) this.#publish(rev);
    }
  }
}

function errText(e: unknown): string {
  const m = e instanceof Error ? e.message : String(e);
  // gRPC messages can be long; keep status readable.
  return m.length > 300 ? m.slice(0, 300) + '…' : m;
}

/** Authentication and permission errors will not fix themselves by waiting. */
function retryable(e: unknown): boolean {
  const name = (e as { constructor?: { name?: string } })?.constructor?.name ?? '';
  return !/Authentication|PermissionDenied|InvalidAuthToken/.test(name);
}

// Not unref()'d: start() awaits it before anything else keeps the process alive.
function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

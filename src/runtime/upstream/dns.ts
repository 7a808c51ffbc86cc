/**
 * Hostname resolution for DNS clusters: `dns.lookup` (the system resolver, so /etc/hosts works)
 * with every address, cached for a TTL; failures are cached briefly so a dead name does not cost a
 * lookup per request. Concurrent lookups of one name share one promise. IP literals pass through.
 */
import { lookup as dnsLookup, type LookupAddress } from 'node:dns';
import { isIP } from 'node:net';

export type LookupFn = (
  hostname: string,
  options: { all: true },
  callback: (err: NodeJS.ErrnoException | null, addresses: LookupAddress[]) => void,
) => void;

export interface DnsCacheOptions {
  /** How long a successful answer is used (default 30 s). */
  ttlMs?: number;
  /** How long a failure is remembered (default 2 s). */
  negativeTtlMs?: number;
  /** Most names kept; the oldest entry is dropped beyond it (default 1024). */
  maxEntries?: number;
  lookup?: LookupFn;
  now?: () => number;
}

export class DnsError extends Error {
  constructor(readonly hostname: string, readonly code: string) {
    super(`DNS lookup of ${hostname} failed: ${code}`);
    this.name = 'DnsError';
  }
}

interface Entry {
  addresses: string[] | undefined;
  error: DnsError | undefined;
  expires: number;
}

export class DnsCache {
  readonly #ttl: number;
  readonly #negTtl: number;
  readonly #max: number;
  readonly #lookup: LookupFn;
  readonly #now: () => number;
  readonly #entries = new Map<string, Entry>();
  readonly #inflight = new Map<string, Promise<string[]>>();

  constructor(opts: DnsCacheOptions = {}) {
    this.#ttl = opts.ttlMs ?? 30_000;
    this.#negTtl = opts.negativeTtlMs ?? 2_000;
    this.#max = opts.maxEntries ?? 1024;
    this.#lookup = opts.lookup ?? (dnsLookup as unknown as LookupFn);
    this.#now = opts.now ?? Date.now;
  }

  /**
   * The cached answer when fresh: addresses, a cached DnsError, or undefined (resolve needed).
   * IP literals answer themselves.
   */
  cached(hostname: string): string[] | DnsError | undefined {
    if (isIP(hostname) !== 0) return [hostname];
    const e = this.#entries.get(hostname);
    if (e === undefined || e.expires <= this.#now()) return undefined;
    return e.error ?? e.addresses;
  }

  /** Addresses for `hostname`; rejects with DnsError. */
  resolve(hostname: string): Promise<string[]> {
    const hit = this.cached(hostname);
    if (hit instanceof DnsError) return Promise.reject(hit);
    if (hit !== undefined) return Promise.resolve(hit);
    let p = this.#inflight.get(hostname);
    if (p === undefined) {
      p = new Promise<string[]>((resolve, reject) => {
        this.#lookup(hostname, { all: true }, (err, addrs) => {
          this.#inflight.delete(hostname);
          if (err !== null || addrs.length === 0) {
            const e = new DnsError(hostname, err?.code ?? 'ENODATA');
            this.#store(hostname, { addresses: undefined, error: e, expires: this.#now() + this.#negTtl });
            reject(e);
            return;
          }
          // Stable order so an unchanged answer maps to the same endpoints (and pools).
          const list = [...new Set(addrs.map((a) => a.address))].sort();
          const prev = this.#entries.get(hostname)?.addresses;
          const same = prev !== undefined && prev.length === list.length && prev.every((a, i) => a === list[i]);
          const addresses = same ? prev : list;
          this.#store(hostname, { addresses, error: undefined, expires: this.#now() + this.#ttl });
          resolve(addresses);
        });
      });
      this.#inflight.set(hostname, p);
    }
    return p;
  }

  #store(hostname: string, e: Entry): void {
    this.#entries.delete(hostname);
    if (this.#entries.size >= this.#max) {
      const oldest = this.#entries.keys().next().value;
      if (oldest !== undefined) this.#entries.delete(oldest);
    }
    this.#entries.set(hostname, e);
  }
}

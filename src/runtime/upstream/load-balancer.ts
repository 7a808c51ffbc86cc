/**
 * Endpoint selection for a cluster's lbPolicy (Envoy's load balancers, simplified):
 * - ROUND_ROBIN: smooth weighted round robin (each host gets weight/sum of picks, interleaved);
 * - LEAST_REQUEST: power of two choices: two hosts drawn by weight, the one with fewer active
 *   requests per unit of weight wins;
 * - RANDOM: weighted random.
 * A host with weight <= 0 is never picked unless every host has weight <= 0 (then all count as 1).
 * The random source is injectable so tests can check distributions with a seed.
 */

export type LbPolicy = 'ROUND_ROBIN' | 'LEAST_REQUEST' | 'RANDOM';

/** What the balancer needs to know about a host. */
export interface LbHost {
  readonly weight: number;
  /** Requests (or connections) in flight, for LEAST_REQUEST. */
  readonly active: number;
}

export interface LoadBalancer<H extends LbHost> {
  readonly policy: LbPolicy;
  /** A host from `hosts`, or undefined when the list is empty. */
  pick(hosts: readonly H[]): H | undefined;
}

export interface LoadBalancerOptions {
  /** Uniform [0, 1) source; Math.random by default. */
  random?: () => number;
}

/** A small seeded PRNG (mulberry32) for reproducible tests. */
export function seededRandom(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function effectiveWeights(hosts: readonly LbHost[]): { weights: number[]; total: number } {
  const weights = new Array<number>(hosts.length);
  let total = 0;
  for (let i = 0; i < hosts.length; i++) {
    const w = hosts[i]!.weight > 0 ? hosts[i]!.weight : 0;
    weights[i] = w;
    total += w;
  }
  if (total === 0) {
    weights.fill(1);
    total = hosts.length;
  }
  return { weights, total };
}

/** Index drawn with probability weight/total; `cum` holds running sums. */
function drawIndex(cum: readonly number[], total: number, r: number): number {
  const x = r * total;
  let lo = 0;
  let hi = cum.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (cum[mid]! > x) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

/** Cached per host list (identity): weights and running sums. */
interface WeightTable {
  hosts: readonly LbHost[];
  weights: number[];
  cum: number[];
  total: number;
  uniform: boolean;
}

function weightTable(hosts: readonly LbHost[]): WeightTable {
  const { weights, total } = effectiveWeights(hosts);
  const cum = new Array<number>(weights.length);
  let acc = 0;
  let uniform = true;
  for (let i = 0; i < weights.length; i++) {
    acc += weights[i]!;
    cum[i] = acc;
    if (weights[i] !== weights[0]) uniform = false;
  }
  return { hosts, weights, cum, total, uniform };
}

class RoundRobin<H extends LbHost> implements LoadBalancer<H> {
  readonly policy = 'ROUND_ROBIN' as const;
  #table: WeightTable | undefined;
  #current: number[] = [];
  #next = 0;

  pick(hosts: readonly H[]): H | undefined {
    if (hosts.length <= 1) return hosts[0];
    if (this.#table?.hosts !== hosts) {
      this.#table = weightTable(hosts);
      this.#current = new Array<number>(hosts.length).fill(0);
      this.#next = 0;
    }
    const t = this.#table;
    if (t.uniform) {
      const h = hosts[this.#next % hosts.length];
      this.#next = (this.#next + 1) % hosts.length;
      return h;
    }
    // Smooth weighted round robin (as in nginx): raise every host by its weight, take the
    // highest, lower it by the total. Over `total` picks each host is chosen `weight` times.
    let best = 0;
    for (let i = 0; i < hosts.length; i++) {
      this.#current[i]! += t.weights[i]!;
      if (this.#current[i]! > this.#current[best]!) best = i;
    }
    this.#current[best]! -= t.total;
    return hosts[best];
  }
}

class RandomLb<H extends LbHost> implements LoadBalancer<H> {
  readonly policy = 'RANDOM' as const;
  #table: WeightTable | undefined;
  constructor(private readonly random: () => number) {}

  pick(hosts: readonly H[]): H | undefined {
    if (hosts.length <= 1) return hosts[0];
    if (this.#table?.hosts !== hosts) this.#table = weightTable(hosts);
    const t = this.#table;
    if (t.uniform) return hosts[Math.floor(this.random() * hosts.length)];
    return hosts[drawIndex(t.cum, t.total, this.random())];
  }
}

class LeastRequest<H extends LbHost> implements LoadBalancer<H> {
  readonly policy = 'LEAST_REQUEST' as const;
  #table: WeightTable | undefined;
  constructor(private readonly random: () => number) {}

  #draw(t: WeightTable, n: number): number {
    return t.uniform ? Math.floor(this.random() * n) : drawIndex(t.cum, t.total, this.random());
  }

  pick(hosts: readonly H[]): H | undefined {
    if (hosts.length <= 1) return hosts[0];
    if (this.#table?.hosts !== hosts) this.#table = weightTable(hosts);
    const t = this.#table;
    const a = this.#draw(t, hosts.length);
    let b = this.#draw(t, hosts.length);
    if (b === a) b = (a + 1) % hosts.length;
    // Compare load per unit of weight; (active+1) keeps idle hosts ordered by weight.
    const la = (hosts[a]!.active + 1) / t.weights[a]!;
    const lb = (hosts[b]!.active + 1) / t.weights[b]!;
    return lb < la ? hosts[b] : hosts[a];
  }
}

/** A balancer for one cluster; keeps its own state (round-robin position). */
export function createLoadBalancer<H extends LbHost>(policy: LbPolicy, opts: LoadBalancerOptions = {}): LoadBalancer<H> {
  const random = opts.random ?? Math.random;
  switch (policy) {
    case 'ROUND_ROBIN': return new RoundRobin<H>();
    case 'RANDOM': return new RandomLb<H>(random);
    case 'LEAST_REQUEST': return new LeastRequest<H>(random);
  }
}

/**
 * Weighted pick among route destinations (VirtualService route weights). Returns the index, or -1
 * when no destination has a positive weight.
 */
export function pickWeighted(weights: readonly number[], total: number, r: number): number {
  if (total <= 0) return -1;
  let x = r * total;
  for (let i = 0; i < weights.length; i++) {
    const w = weights[i]!;
    if (w <= 0) continue;
    if (x < w) return i;
    x -= w;
  }
  // Rounding at the top edge: the last positive weight.
  for (let i = weights.length - 1; i >= 0; i--) if (weights[i]! > 0) return i;
  return -1;
}

// The event-loop delay gauges (nodejs_eventloop_lag_{min,max,mean,stddev,p50,p90,p99}_seconds),
// sampled only while the loop has work. prom-client samples all the time: its timer woke an idle
// proxy 10 times a second (at 100 ms; 100 at its default 10 ms), most of what an idle tlsgate
// spent. An idle loop has no delay worth sampling, so the sampler runs while the loop was busy
// for at least 5% of the last second, and stops after 10 quieter seconds in a row (a garbage
// collection or a config poll alone takes 1-3% of a second on these machines).
import { monitorEventLoopDelay, performance, type EventLoopUtilization, type IntervalHistogram } from 'node:perf_hooks';
import { Gauge, type Registry } from 'prom-client';

/** Busy share of a second (event-loop utilization) that starts the sampler. */
const BUSY = 0.05;
/** Quiet seconds in a row that stop it. */
const QUIET_CHECKS = 10;

export interface LoopDelayOptions {
  /** Sampling interval while on (prom-client's eventLoopMonitoringPrecision). */
  resolutionMs: number;
  /** How often utilization is checked. */
  checkMs?: number;
}

export class LoopDelayMonitor {
  readonly #histogram: IntervalHistogram;
  readonly #timer: NodeJS.Timeout;
  #last: EventLoopUtilization = performance.eventLoopUtilization();
  #on = false;
  #quiet = 0;

  constructor(registry: Registry, prefix: string, opts: LoopDelayOptions) {
    this.#histogram = monitorEventLoopDelay({ resolution: opts.resolutionMs });
    // Read and reset together when the first of them is collected (registries collect in the
    // order metrics were registered), so a scrape covers the time since the one before; no
    // sample (an idle loop) reads 0.
    const seen = { min: 0, max: 0, mean: 0, stddev: 0, p50: 0, p90: 0, p99: 0 };
    const read = (): void => {
      const h = this.#histogram;
      const s = (ns: number): number => (h.count > 0 ? ns / 1e9 : 0);
      Object.assign(seen, {
        min: s(h.min), max: s(h.max), mean: s(h.mean), stddev: s(h.stddev), p50: s(h.percentile(50)), p90: s(h.percentile(90)), p99: s(h.percentile(99)),
      });
      h.reset();
    };
    const described = { min: 'The minimum recorded', max: 'The maximum recorded', mean: 'The mean of the recorded', stddev: 'The standard deviation of the recorded',
      p50: 'The 50th percentile of the recorded', p90: 'The 90th percentile of the recorded', p99: 'The 99th percentile of the recorded' } as const;
    for (const key of Object.keys(seen) as (keyof typeof seen)[]) {
      const name = `${prefix}nodejs_eventloop_lag_${key}_seconds`;
      // Replaces the gauge of that name prom-client's default metrics registered, if any.
      registry.removeSingleMetric(name);
      new Gauge({
        name,
        help: `${described[key]} event loop delay${key === 'min' || key === 'max' ? '' : 's'} (0 while the loop is idle).`,
        registers: [registry],
        aggregator: key === 'min' ? 'min' : key === 'max' ? 'max' : 'average',
        collect() {
          if (key === 'min') read();
          this.set(seen[key]);
        },
      });
    }
    this.#timer = setInterval(() => this.#check(), opts.checkMs ?? 1000);
    this.#timer.unref();
  }

  /** Whether the sampler runs now. */
  get sampling(): boolean {
    return this.#on;
  }

  #check(): void {
    const now = performance.eventLoopUtilization();
    const busy = performance.eventLoopUtilization(now, this.#last).utilization;
    this.#last = now;
    if (busy >= BUSY) {
      this.#quiet = 0;
      if (!this.#on) this.#histogram.enable();
      this.#on = true;
    } else if (this.#on && ++this.#quiet >= QUIET_CHECKS) {
      this.#histogram.disable();
      this.#on = false;
    }
  }

  close(): void {
    clearInterval(this.#timer);
    this.#histogram.disable();
    this.#on = false;
  }
}

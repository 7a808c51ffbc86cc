// The event-loop delay gauges sample only while the loop is busy: on a real event loop, a quiet
// stretch leaves the sampler off (the gauges read 0), a busy one turns it on and a blocked loop
// shows in the gauges, and quiet checks turn it off again. Also: a PromTelemetry scrape still has
// every nodejs_eventloop_lag_* series, once each.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Registry } from 'prom-client';
import { LoopDelayMonitor } from '../../../src/admin/loop-delay.js';
import { PromTelemetry } from '../../../src/admin/telemetry.js';
import { sleep } from '../../helpers/ports.js';

/** Keeps the thread busy for `ms` without yielding to the loop. */
const block = (ms: number): void => {
  const end = Date.now() + ms;
  while (Date.now() < end) { /* busy */ }
};

function series(text: string, name: string): number[] {
  return text.split('\n').filter((l) => l.startsWith(name + ' ')).map((l) => Number(l.slice(name.length + 1)));
}

describe('LoopDelayMonitor', () => {
  it('off while the loop idles (gauges 0), on once it is busy (a blocked loop shows), off again after ten quiet checks', { timeout: 40_000 }, async () => {
    const registry = new Registry();
    // Checks every 200 ms, sampling every 10 ms while on.
    const m = new LoopDelayMonitor(registry, 'x_', { resolutionMs: 10, checkMs: 200 });
    const quiet = async (what: string): Promise<void> => {
      // Ten quiet checks (2 s) after the last busy one; a loaded machine may make one check busy.
      const deadline = Date.now() + 10_000;
      while (m.sampling && Date.now() < deadline) await sleep(100);
      assert.equal(m.sampling, false, what);
    };
    try {
      await sleep(500);
      await quiet('idle: not sampling');
      // Off: nothing is sampled between two scrapes, and the gauges read 0.
      await registry.metrics();
      await sleep(300);
      assert.deepEqual(series(await registry.metrics(), 'x_nodejs_eventloop_lag_max_seconds'), [0]);
      // Busy: 60 ms of every 100 for half a second (60% utilization).
      for (let i = 0; i < 5; i++) {
        block(60);
        await sleep(40);
      }
      await sleep(250);
      assert.equal(m.sampling, true, 'busy: sampling');
      await registry.metrics(); // start a fresh interval
      await sleep(50);
      block(150);
      await sleep(50);
      const text = await registry.metrics();
      const [max] = series(text, 'x_nodejs_eventloop_lag_max_seconds');
      assert.ok(max !== undefined && max >= 0.1, `a 150 ms block reads as a delay: max ${String(max)} s`);
      const [p50] = series(text, 'x_nodejs_eventloop_lag_p50_seconds');
      assert.ok(p50 !== undefined && p50 > 0 && p50 <= max, `p50 ${String(p50)}`);
      await quiet('quiet again: not sampling');
    } finally {
      m.close();
    }
  });

  it('PromTelemetry exposes every nodejs_eventloop_lag series once, under the tlsgate_ prefix', async () => {
    const t = new PromTelemetry({ accessLog: 'off', recentEntries: 0 });
    try {
      const text = await t.registry.metrics();
      for (const k of ['', '_min', '_max', '_mean', '_stddev', '_p50', '_p90', '_p99']) {
        const name = `tlsgate_nodejs_eventloop_lag${k}_seconds`;
        assert.equal(series(text, name).length, 1, name);
        assert.equal(text.split('\n').filter((l) => l === `# TYPE ${name} gauge`).length, 1, `${name}: one TYPE line`);
      }
    } finally {
      t.loopDelay.close();
    }
  });
});

// PromTelemetry's per-series incrementers (counter()) against the same series counted by name
// (count()), read back through the Prometheus registry as an admin scrape would.
import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { PromTelemetry } from '../../../src/admin/telemetry.js';
import { counterOf, type Telemetry } from '../../../src/runtime/telemetry.js';
import { isoTime } from '../../../src/runtime/iso-time.js';

function seriesValue(text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith(series + ' ')) return Number(line.slice(series.length + 1));
  }
  return undefined;
}

describe('PromTelemetry counters', () => {
  it('counter() and count() add to one series; negative steps are ignored', async () => {
    const t = new PromTelemetry({ accessLog: 'off', recentEntries: 0 });
    const inc = t.counter('requests_total', { listener: 'l1', route: 'r', code_class: '2xx' });
    inc();
    inc(2);
    inc(-5);
    t.count('requests_total', { code_class: '2xx', route: 'r', listener: 'l1' }, 4);
    const text = await t.registry.metrics();
    assert.equal(seriesValue(text, 'tlsgate_requests_total{code_class="2xx",listener="l1",route="r"}'), 7);
  });

  it('a series exists (at 0) from the moment its incrementer is made', async () => {
    const t = new PromTelemetry({ accessLog: 'off', recentEntries: 0 });
    t.counter('downstream_bytes_total', { listener: 'l2', direction: 'sent' });
    const text = await t.registry.metrics();
    assert.equal(seriesValue(text, 'tlsgate_downstream_bytes_total{direction="sent",listener="l2"}'), 0);
  });

  it('counterOf falls back to count() for a Telemetry without counter()', () => {
    const seen: [string, Record<string, string> | undefined, number | undefined][] = [];
    const t: Telemetry = {
      accessLog() {}, observe() {}, gauge() {}, log() {},
      count(name, labels, by) { seen.push([name, labels, by]); },
    };
    const inc = counterOf(t, 'x_total', { a: 'b' });
    inc();
    inc(3);
    assert.deepEqual(seen, [['x_total', { a: 'b' }, 1], ['x_total', { a: 'b' }, 3]]);
  });

  it('accessLogEnabled says whether entries go anywhere', () => {
    assert.equal(new PromTelemetry({ accessLog: 'off', recentEntries: 0 }).accessLogEnabled, false);
    assert.equal(new PromTelemetry({ accessLog: 'off', recentEntries: 10 }).accessLogEnabled, true);
    const t = new PromTelemetry({ accessLog: 'off', recentEntries: 0 });
    const off = t.subscribe(() => {});
    assert.equal(t.accessLogEnabled, true);
    off();
    assert.equal(t.accessLogEnabled, false);
  });
});

describe('isoTime', () => {
  it('equals Date#toISOString for any millisecond, in and out of order', () => {
    const samples = [0, 1, 9, 10, 99, 100, 999, 1000, 1001, 59_999, 60_000, Date.now(), Date.now() + 1, Date.now() - 1000,
      951_782_400_000 /* 2000-02-29 */, 4_102_444_799_999 /* 2099-12-31T23:59:59.999Z */, 253_402_300_799_999 /* year 9999 */];
    // Deterministic spread of values around "now" and across years.
    let x = 12345;
    for (let i = 0; i < 2000; i++) {
      x = (x * 1103515245 + 12345) % 2147483648;
      samples.push(Date.now() + (x % 5000) - 2500, x * 1000 + (x % 1000));
    }
    for (const ms of samples) assert.equal(isoTime(ms), new Date(ms).toISOString(), String(ms));
  });
});
